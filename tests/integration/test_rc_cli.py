"""Stage 3 through the real entry point: the RC loop with the vLLM CPU engine and the scripted judge over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qed_lightning.cli import make_cli
from runs import read_metrics, series

REPO = Path(__file__).resolve().parents[2]


def _run(tiny_model_dir: Path, root: Path, *overrides: str):
    cli = make_cli(args=[
        "--config", str(REPO / "configs/demo/rc.yaml"),
        "--trainer.default_root_dir", str(root),
        "--model.init_args.model_name_or_path", str(tiny_model_dir),
        "--model.init_args.export_dir", str(root / "hf"),
        "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"),
        *overrides,
    ])
    return cli, read_metrics(root)


def _graded(rows) -> list[float]:
    """Rollouts graded per step: by the judge (`judge/ok`), or as truncated (an empty response, no judge call)."""
    ok, truncated = series(rows, "judge/ok"), series(rows, "judge/truncated")
    assert len(ok) == len(truncated) and min(ok) > 0
    return [a + b for a, b in zip(ok, truncated)]


@pytest.mark.slow
def test_demo_rc_steps_log_cycles_and_train_every_weight(tiny_model_dir, tmp_path):
    _, rows = _run(tiny_model_dir, tmp_path, "--trainer.max_steps", "2", "--data.init_args.val_size", "2",
                   "--trainer.val_check_interval", "2", "--trainer.num_sanity_val_steps", "0")
    assert len(series(rows, "rollout/reward_mean")) == 2
    # 2 problems x 2 of the K+1 = 3 states x G=4 rollouts graded per step, all against the original problem (an
    # empty response is scored 0 as truncated without a judge call, so count both)
    assert _graded(rows) == [16.0, 16.0]
    assert series(rows, "rc/states") == [4.0, 4.0]
    first_step = next(r for r in rows if "rc/states" in r)  # (the data counts have a row of their own, at step 0)
    cycles = [k for k in first_step if k.startswith("rc/reward_cycle_")]
    assert cycles and set(cycles) <= {"rc/reward_cycle_0", "rc/reward_cycle_1", "rc/reward_cycle_2"}
    for key in ["rc/summary_len_mean", "rc/summary_empty_frac", "rc/summary_truncated_frac", "rc/summarizer_s",
                "rc/trajectory_tokens_mean", "time/rc_loop_s", "train/loss", "train/grad_norm"]:
        assert len(series(rows, key)) == 2, key
    assert all(0 < s <= 32 for s in series(rows, "rc/summary_len_mean"))  # summarizer_max_new_tokens: 32
    assert series(rows, "rollout/policy_version") == [1.0, 2.0]
    assert max(series(rows, "rollout/logprob_diff_max")) < 1e-3  # on-policy: the engine follows the trainer
    # validation ran the scaffold: a reward for each of the K=2 attempts
    assert series(rows, "val/reward_cycle_0") and series(rows, "val/reward_cycle_1")
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert [k for k in before if torch.equal(before[k], after[k])] == []


@pytest.mark.slow
def test_a_separate_summarizer_engine_never_receives_policy_weights(tiny_model_dir, tmp_path):
    """Two in-process vLLM engines at once: the policy's (synced every step) and a frozen summarizer."""
    cli, rows = _run(
        tiny_model_dir, tmp_path, "--trainer.max_steps", "2", "--data.init_args.val_size", "0",
        "--model.init_args.export_hf", "false",
        "--model.init_args.summarizer_model", str(tiny_model_dir),
        "--model.init_args.summarizer", "qed_lightning.rollout.VLLMEngine",
        "--model.init_args.summarizer.init_args.max_model_len", "2048",
        "--model.init_args.summarizer.init_args.kv_cache_memory_gib", "0.25",
    )
    module = cli.model
    assert module.summarizer is not module.engine
    assert module.engine.policy_version == 2 and module.summarizer.policy_version == 0
    assert len(series(rows, "rc/summarizer_s")) == 2 and all(s > 0 for s in series(rows, "rc/summarizer_s"))
    assert _graded(rows) == [16.0, 16.0]
