"""Streaming groups across a real SIGKILL: an asynchronous-layout run (max_lag 2: the stream runs two releases ahead
of the trainer, so every checkpoint holds carried groups) is killed after a checkpoint and resumed with
`--ckpt_path last`; no group is lost or trained twice, and the killed run's vLLM server does not outlive it; its
temporary weights are removed, and logged, when the resumed run starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_async_layout import assert_no_server_left

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
STEPS, KILL_AFTER, P = 6, 2, 4


def _command(tiny_model_dir: Path, root: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "qed_lightning.cli", "--config", str(REPO / "configs/demo/rl.yaml"),
        "--config", str(REPO / "configs/layout/one_node_async.yaml"),
        "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(STEPS),
        "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
        "--model.init_args.model_name_or_path", str(tiny_model_dir), "--model.init_args.export_dir", str(root / "hf"),
        "--model.init_args.max_new_tokens", "24", "--model.init_args.engine.init_args.max_lag", "2",
        "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"), "--data.init_args.val_size", "0",
        *extra,
    ]


def _stream_state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]["StreamCallback"]


def _trained(state: dict) -> list[tuple[int, int, int]]:
    return [tuple(e) for e in state["ledger"] if e[2] >= 0]


def test_carried_groups_survive_a_sigkill_and_resume_without_loss_or_repeat(tiny_model_dir, tmp_path):
    root, env = tmp_path / "run", {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log = tmp_path / "killed.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(_command(tiny_model_dir, root), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 900
        while not list((root / "checkpoints").glob(f"*step={KILL_AFTER}.ckpt")):
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # no handler, no clean-up: the stream's threads die mid-group
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert_no_server_left(tiny_model_dir)  # PR_SET_PDEATHSIG took the orphaned server down
    # what `--ckpt_path last` resumes from (the step-2 checkpoint, or the one before it when the kill came between
    # writing it and pointing last.ckpt at it); read now, before the resumed run replaces it
    killed = _stream_state(root / "checkpoints" / "last.ckpt")
    assert killed["pending"], "no group was carried over at the checkpoint: the test would prove nothing"
    leftovers = sorted(p.name for p in (root / ".weights").iterdir())  # the killed run's pushed weights and state
    assert leftovers, "the killed run left no temporary weights: their clean-up at the next start is not exercised"

    resumed_log = tmp_path / "resumed.log"
    with open(resumed_log, "w") as fh:
        done = subprocess.run(_command(tiny_model_dir, root, "--ckpt_path", "last"), stdout=fh,
                              stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=1200)
    assert done.returncode == 0, resumed_log.read_text()[-4000:]
    assert "Restoring states from the checkpoint path" in resumed_log.read_text()
    # the resumed run found the killed run's temporary weights, logged them with their size, removed them, and its
    # own are gone with it
    assert f"removing {len(leftovers)} leftover(s) of an earlier run in" in resumed_log.read_text()
    assert f"GB): {', '.join(leftovers)}" in resumed_log.read_text() and not (root / ".weights").exists()
    (final_ckpt,) = (root / "checkpoints").glob(f"*step={STEPS}.ckpt")
    final = _stream_state(final_ckpt)
    trained = _trained(final)
    keys = [(n, j) for n, j, _ in trained]
    assert len(keys) == len(set(keys)) == STEPS * P  # every step trained P groups, none twice
    assert [s for _, _, s in trained] == sorted(s for _, _, s in trained)
    assert trained[:len(_trained(killed))] == _trained(killed)  # the resumed run continued its checkpoint's ledger
    # the groups the killed run carried were generated again and trained (or are still carried): none lost
    later = set(keys) | {(n, j) for n, j, *_ in final["pending"]}
    assert {(n, j) for n, j, *_ in killed["pending"]} <= later
    # and every problem the stream ever released is trained, still pending, or still being expanded
    accounted = {n for n, _ in keys} | {e[0] for e in final["pending"]} | {e[0] for e in final["unexpanded"]}
    assert accounted == set(range(final["cursor"]))
    assert_no_server_left(tiny_model_dir)
