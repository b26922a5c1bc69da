"""The one-node asynchronous layout through `qed-fit` on CPU: `configs/layout/one_node_async.yaml` composed with the
demo configs, so the layout starts a REAL vLLM server on core 1 (LocalVLLMPool), keeps the trainer on core 0, and
streams complete, graded groups (GroupStream) while the trainer steps. Checked: it learns with max_lag 1 and every
trained sample is within max_lag; with max_lag 0 it reproduces the sequential (colocated) run; stage 3 runs its RC
loop in the stream; the server goes away with the run; a server killed mid-run ends the run within a bound, with one
error naming the server, its log and the weight version, and the run's temporary weights removed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from qed_lightning.cli import make_cli
from runs import read_metrics, series, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
LAYOUT = REPO / "configs/layout/one_node_async.yaml"


def _args(tiny_model_dir: Path, root: Path, *overrides: str, stage: str = "demo/rl.yaml", layout: bool = True):
    return [
        "--config", str(REPO / "configs" / stage), *(["--config", str(LAYOUT)] if layout else []),
        "--trainer.default_root_dir", str(root), "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
        "--model.init_args.model_name_or_path", str(tiny_model_dir), "--model.init_args.export_dir", str(root / "hf"),
        "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"), "--data.init_args.val_size", "0",
        *overrides,
    ]


def _run(tiny_model_dir: Path, root: Path, *overrides: str, stage: str = "demo/rl.yaml", layout: bool = True):
    make_cli(args=_args(tiny_model_dir, root, *overrides, stage=stage, layout=layout))
    return read_metrics(root)


def servers_of(model_dir: Path) -> list[psutil.Process]:
    """Live vLLM servers serving `model_dir` (the layout's own, started for this test)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "vllm.entrypoints.openai.api_server" in cmd and str(model_dir) in cmd:
            found.append(proc)
    return found


def assert_no_server_left(model_dir: Path, wait_s: float = 60.0) -> None:
    deadline = time.monotonic() + wait_s
    while servers_of(model_dir) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not servers_of(model_dir), "the layout's vLLM server outlived its run"


def test_the_async_layout_learns_and_every_trained_sample_is_within_max_lag(tiny_model_dir, tmp_path):
    """The learning test of tests/integration/test_rl_cli.py (same task, steps, sizes, threshold +0.15) with the
    asynchronous layout at max_lag 1: from step 1 on, most samples come from the weights one step old."""
    rows = _run(tiny_model_dir, tmp_path,
                "--trainer.max_steps", "30", "--model.init_args.group_size", "8",
                "--model.init_args.max_new_tokens", "24",
                "--model.init_args.optimizer.init_args.lr", "3e-3", "--model.init_args.export_hf", "false")
    rewards = series(rows, "rollout/reward_mean")
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards
    # every trained sample within max_lag = 1, and the overlap is real: off-policy samples were trained on
    assert max(series(rows, "rollout/policy_lag_max")) <= 1.0
    assert sum(series(rows, "rollout/policy_lag_frac_1")) > 10, series(rows, "rollout/policy_lag_frac_1")
    shares = [a + b for a, b in zip(series(rows, "rollout/policy_lag_frac_0"),
                                    series(rows, "rollout/policy_lag_frac_1"))]
    assert shares == pytest.approx([1.0] * 30)
    assert len(series(rows, "rollout/stale_dropped")) == 30  # counted every step (drops are tested in unit tests)
    assert series(rows, "time/wait_s") and max(series(rows, "rollout/mixed_version_frac")) == 0.0  # "wait" pushes
    assert_no_server_left(tiny_model_dir)


def test_max_lag_0_reproduces_the_sequential_colocated_run(tiny_model_dir, tmp_path):
    """Same seeds, same problems in the same order: with max_lag 0 the stream generates each step's problems on that
    step's weights, so the run is the sequential one. Measured (two runs): rewards equal, losses to 7e-8, weights to
    1.3e-6 after 3 steps (the server's and the in-process engine's log-probs differ by float noise, ~1e-7, which
    the importance ratio carries into the loss)."""
    common = ["--trainer.max_steps", "3", "--model.init_args.max_new_tokens", "24"]
    sequential = _run(tiny_model_dir, tmp_path / "sequential", *common, layout=False)
    streamed = _run(tiny_model_dir, tmp_path / "async", *common, "--model.init_args.engine.init_args.max_lag", "0")
    assert series(streamed, "rollout/reward_mean") == series(sequential, "rollout/reward_mean")
    assert series(streamed, "train/loss") == pytest.approx(series(sequential, "train/loss"), rel=1e-4, abs=1e-6)
    assert series(streamed, "rollout/policy_lag_max") == [0.0, 0.0, 0.0]
    a = load_file(str(tmp_path / "sequential" / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "async" / "hf" / "model.safetensors"))
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)
    assert all(not torch.equal(init[k], a[k]) for k in a)  # training moved every weight: equality is not trivial


def test_stage_3_runs_its_reasoning_cache_loop_in_the_stream(tiny_model_dir, tmp_path):
    rows = _run(tiny_model_dir, tmp_path, "--trainer.max_steps", "2", "--model.init_args.max_new_tokens", "16",
                stage="demo/rc.yaml")
    assert len(series(rows, "train/loss")) == 2
    # the step's groups are RC states (2 per problem): their cycle rewards are logged, their lag bounded
    assert series(rows, "rc/states") and any(k.startswith("rc/reward_cycle_") for k in rows[-1])
    assert max(series(rows, "rollout/policy_lag_max")) <= 1.0


def test_dynamic_sampling_and_the_overlong_penalty_compose_with_the_stream(tiny_model_dir, tmp_path):
    """configs/demo/rl_dapo.yaml in the asynchronous layout: the stream grades with the overlong penalty
    (`grade_rollouts`) and takes only groups whose rewards differ (`accept`); a flat group is replaced by the next
    problem of the order and counted, so no trained group is flat."""
    rows = _run(tiny_model_dir, tmp_path, "--trainer.max_steps", "3", "--model.init_args.max_new_tokens", "24",
                "--model.init_args.overlong_buffer", "8",
                stage="demo/rl_dapo.yaml")
    assert len(series(rows, "train/loss")) == 3
    assert series(rows, "rollout/zero_adv_group_frac") == [0.0, 0.0, 0.0]
    assert len(series(rows, "rollout/skipped_groups")) == 3  # counted every step (the unit tests pin the count)
    assert max(series(rows, "rollout/policy_lag_max")) <= 1.0


def test_a_pool_server_killed_mid_run_ends_the_run_with_one_error_naming_it(tiny_model_dir, tmp_path):
    """Issue 19: before, the trainer trained the groups already generated and then waited forever (2 of 2 tries).
    Now the stream's bounded wait checks the pool (its server process, its /health, a failed reload): the run
    exits non-zero within a minute or two of the kill, with the server's URL, its log and the weight version, and
    the run's temporary weights (`<run>/.weights`) are removed on the way out."""
    root = tmp_path / "run"
    cmd = [sys.executable, "-m", "qed_lightning.cli",
           *_args(tiny_model_dir, root, "--trainer.max_steps", "400", "--model.init_args.max_new_tokens", "24")]
    log = tmp_path / "run.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO,
                                start_new_session=True)
    try:
        loaded, deadline = root / ".weights" / "loaded_version", time.monotonic() + 600
        while not (loaded.exists() and loaded.read_text().strip() not in ("", "0", "1")):  # 2 steps trained, loaded
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the run did not reach step 2 in 600 s"
            time.sleep(0.5)
        (server,) = [p for p in servers_of(tiny_model_dir) if "server_guard" not in " ".join(p.cmdline())]
        server.kill()
        killed = time.monotonic()
        code = proc.wait(timeout=300)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert code != 0 and took < 120, (code, took, text[-4000:])
    named = re.findall(r"vLLM server http://127\.0\.0\.1:\d+ \(log \S+/vllm_logs/vllm_server_0\.log\) [^\n]*"
                       r"weight version v?\d+", text)
    assert named, text[-4000:]
    assert not (root / ".weights").exists() and (root / "vllm_logs" / "vllm_server_0.log").exists()
    assert_no_server_left(tiny_model_dir)
