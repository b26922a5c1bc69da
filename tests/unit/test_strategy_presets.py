"""Every strategy preset composes with a stage config (`--config STAGE --config configs/strategy/X.yaml`): the later
file wins, the stage's own strategy arguments do not leak into another strategy class, the rest is untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "configs" / "strategy").glob("*.yaml"))
EXPECTED = {
    "ddp": "lightning.pytorch.strategies.DDPStrategy",
    "fsdp2": "qed_lightning.parallel.FSDP2Strategy",
    "deepspeed_zero2": "qed_lightning.parallel.DeepSpeedStrategy",
    "deepspeed_zero3": "qed_lightning.parallel.DeepSpeedStrategy",
    "deepspeed_zero3_offload": "qed_lightning.parallel.DeepSpeedStrategy",
}


def test_every_preset_is_listed():
    assert sorted(p.stem for p in PRESETS) == sorted(EXPECTED)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_composes_with_the_rl_config(preset, print_config):
    base = print_config(REPO / "configs/rl.yaml")
    composed = print_config(REPO / "configs/rl.yaml", preset)
    strategy = composed["trainer"]["strategy"]
    assert strategy["class_path"] == EXPECTED[preset.stem]
    own = yaml.safe_load(preset.read_text())["trainer"]["strategy"].get("init_args", {})
    for key, value in own.items():
        assert strategy["init_args"][key] == value, key
    # everything but the strategy is the stage config's
    assert {k: v for k, v in composed["trainer"].items() if k != "strategy"} == \
        {k: v for k, v in base["trainer"].items() if k != "strategy"}
    assert composed["model"] == base["model"] and composed["data"] == base["data"]


def test_zero3_and_fsdp2_presets_shard_what_they_say(print_config):
    zero3 = print_config(REPO / "configs/rl.yaml",
                         REPO / "configs/strategy/deepspeed_zero3_offload.yaml")["trainer"]["strategy"]["init_args"]
    assert (zero3["stage"], zero3["offload_optimizer"], zero3["offload_parameters"]) == (3, True, True)
    fsdp2 = print_config(REPO / "configs/sft.yaml",
                         REPO / "configs/strategy/fsdp2.yaml")["trainer"]["strategy"]["init_args"]
    assert fsdp2["data_parallel_size"] == "auto" and fsdp2["tensor_parallel_size"] == 1


def test_fsdp2_strategy_shards_over_every_process(monkeypatch):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from qed_lightning.parallel import FSDP2Strategy

    captured = {}
    # stand-in for ModelParallelStrategy.setup_environment (process group + device mesh), which reads the sizes
    monkeypatch.setattr(ModelParallelStrategy, "setup_environment",
                        lambda self: captured.update(sizes=(self._data_parallel_size, self._tensor_parallel_size)))
    strategy = FSDP2Strategy()
    strategy.num_nodes, strategy.parallel_devices = 2, ["d0", "d1", "d2", "d3"]
    strategy.setup_environment()
    # one data-parallel mesh dimension over 2 nodes x 4 devices (Lightning's default would be 2 x 4, data x tensor)
    assert captured["sizes"] == (8, 1)


def test_pipeline_layout_composes_with_a_stage_and_a_strategy(print_config):
    printed = print_config(REPO / "configs/rl.yaml", REPO / "configs/strategy/fsdp2.yaml",
                           REPO / "configs/layout/pipeline_rl.yaml")
    engine = printed["model"]["init_args"]["engine"]
    assert engine["class_path"] == "qed_lightning.rollout.AsyncRollouts" and engine["init_args"]["max_lag"] == 1
    pool = engine["init_args"]["engine"]
    assert pool["class_path"] == "qed_lightning.rollout.VLLMServerEngine" and pool["init_args"]["sync"] == "checkpoint"
    assert printed["trainer"]["strategy"]["class_path"] == "qed_lightning.parallel.FSDP2Strategy"
    assert printed["model"]["init_args"]["group_size"] == 16  # the stage's own knobs are untouched
