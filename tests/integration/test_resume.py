"""Exact resume: a demo RL run killed with SIGKILL and resumed with `--ckpt_path last` ends with the same weights and
the same rollout records as an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qed_lightning.report.records import read_rollouts

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def _command(tiny_model_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "qed_lightning.cli",
        "--config", str(REPO / "configs/demo/rl.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", str(STEPS),
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1",
        "--model.init_args.model_name_or_path", str(tiny_model_dir),
        "--model.init_args.export_dir", str(root / "hf"),
        "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"),
        "--data.init_args.val_size", "0",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), timeout=600, cwd=REPO)
    assert proc.returncode == 0, log.read_text()[-4000:]


def _kill_after_checkpoint(cmd: list[str], ckpt_dir: Path, step: int, log: Path) -> None:
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
        deadline = time.monotonic() + 600
        while not list(ckpt_dir.glob(f"*step={step}.ckpt")):
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # a real SIGKILL: no handler, no clean-up
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_command(tiny_model_dir, straight), tmp_path / "straight.log")

    _kill_after_checkpoint(_command(tiny_model_dir, killed), killed / "checkpoints", step=3,
                           log=tmp_path / "killed.log")
    assert not (killed / "hf").exists()  # it really died before the end
    _run(_command(tiny_model_dir, killed, "--ckpt_path", "last"), tmp_path / "resumed.log")
    resumed_log = (tmp_path / "resumed.log").read_text()
    assert "Restoring states from the checkpoint path" in resumed_log

    a = load_file(str(straight / "hf" / "model.safetensors"))
    b = load_file(str(killed / "hf" / "model.safetensors"))
    assert set(a) == set(b)
    # Tolerance: generation on CPU is deterministic with the per-(step, problem) seeds, the data order is restored
    # exactly, and the optimizer/scheduler state comes from the checkpoint; the only freedom left is floating-point
    # summation order, so we allow 1e-6.
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    # and training really moved the weights, so equality is not trivial
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(init[k], a[k]) for k in a)
    # the rollout records: each step once, none left from the killed run's unfinished steps, and the resumed run's
    # steps are the uninterrupted run's (same seeds, same weights: the same texts and scores)
    assert sorted(p.name for p in (killed / "rollouts").iterdir()) == [f"step_{s:06d}.jsonl" for s in range(STEPS)]
    straight_records, killed_records = read_rollouts(straight), read_rollouts(killed)
    assert len(killed_records) == STEPS * 16
    assert [(r["step"], r["completion"], r["score"]) for r in killed_records] == \
        [(r["step"], r["completion"], r["score"]) for r in straight_records]
