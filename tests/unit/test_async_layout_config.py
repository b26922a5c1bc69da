"""configs/layout/one_node_async.yaml composes with every RL stage config, and its knobs are refused at the door."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qed_lightning.cli import make_cli
from qed_lightning.rollout import LocalVLLMPool, StreamingRollouts

REPO = Path(__file__).resolve().parents[2]
LAYOUT = REPO / "configs/layout/one_node_async.yaml"


@pytest.mark.parametrize("stage", ["rl.yaml", "rc.yaml", "demo/rl.yaml", "demo/rc.yaml"])
def test_the_async_layout_composes_with_every_rl_stage(stage, print_config):
    base = print_config(REPO / "configs" / stage)
    composed = print_config(REPO / "configs" / stage, LAYOUT)
    engine = composed["model"]["init_args"]["engine"]
    assert engine["class_path"] == "qed_lightning.rollout.StreamingRollouts" and engine["init_args"]["max_lag"] == 1
    pool = engine["init_args"]["engine"]
    assert pool["class_path"] == "qed_lightning.rollout.LocalVLLMPool"
    assert (pool["init_args"]["cpus"], pool["init_args"]["trainer_cpus"], pool["init_args"]["update_mode"]) == (["1"], "0", "wait")
    # only the engine changes: the stage's own knobs (and the paper's IS setting: off) are untouched
    strip = lambda cfg: {k: v for k, v in cfg["model"]["init_args"].items() if k != "engine"}  # noqa: E731
    assert strip(composed) == strip(base) and composed["data"] == base["data"]
    assert composed["model"]["init_args"]["is_correction"] == "none"


def test_the_layouts_knobs_are_checked_before_anything_starts():
    with pytest.raises(ValueError, match="max_lag must be >= 0"):
        StreamingRollouts(LocalVLLMPool(), max_lag=-1)
    with pytest.raises(ValueError, match="either engine.cpus .* or engine.gpus"):
        LocalVLLMPool(cpus=["1"], gpus=["0"])
    with pytest.raises(SystemExit):  # an unknown update mode is refused by the CLI, naming the choices
        make_cli(args=["fit", "--config", str(REPO / "configs/demo/rl.yaml"), "--config", str(LAYOUT),
                       "--model.init_args.engine.init_args.engine.init_args.update_mode", "abort", "--print_config"])


def test_is_correction_knobs_are_validated(capsys):
    with pytest.raises(SystemExit):
        make_cli(args=["fit", "--config", str(REPO / "configs/demo/rl.yaml"), "--model.init_args.is_correction", "clip",
                       "--print_config"])
    assert "is_correction" in capsys.readouterr().err
