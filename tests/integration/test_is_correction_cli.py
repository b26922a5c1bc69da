"""`model.is_correction` through `qed-fit`: the correction acts on off-policy tokens only."""

from __future__ import annotations

from pathlib import Path

import pytest

from qed_lightning.cli import make_cli
from runs import read_metrics, series

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_masked_is_touches_only_the_off_policy_step(tiny_model_dir, tmp_path):
    # sync_interval 2: step 0 samples with the weights it trains (rho = 1 up to float noise), step 1 with the
    # weights of one step earlier, so its rho moves away from 1 and a tight band [1/1.01, 1.01] masks some tokens
    make_cli(args=[
        "--config", str(REPO / "configs/demo/rl.yaml"), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "2", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
        "--model.init_args.model_name_or_path", str(tiny_model_dir), "--model.init_args.export_hf", "false",
        "--model.init_args.max_new_tokens", "24", "--model.init_args.sync_interval", "2",
        "--model.init_args.is_correction", "mask", "--model.init_args.is_cap", "1.01",
        "--model.init_args.judge.init_args.cache_path", str(tmp_path / "grades.sqlite"),
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"), "--data.init_args.val_size", "0",
    ])
    rows = read_metrics(tmp_path)
    is_frac = series(rows, "train/is_frac")
    assert is_frac[0] == 0.0 and 0.0 < is_frac[1] < 1.0, is_frac
    assert series(rows, "rollout/policy_lag_max") == [0.0, 1.0]


def test_an_is_cap_of_at_most_one_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"model.is_cap must be > 1"):
        make_cli(args=["--config", str(REPO / "configs/demo/rl.yaml"), "--model.init_args.is_cap", "1"], run=False)
