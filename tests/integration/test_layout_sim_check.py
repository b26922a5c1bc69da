"""The layout simulator against a real run: `scripts/bench_rl.py` runs the one-node asynchronous layout on this CPU
(vLLM server on core 1, trainer on core 0, max_lag 1) and writes the component speeds it measured on that run's pool
and trainer (`--throughputs-out`: decode tokens/s of one sequence and of a full step's batch, trained tokens/s, judge
latency, push cost, the run's completion lengths); `scripts/simulate_layout.py` predicts the layout's steady-state
step time from them alone. The prediction must be within 25% of the measured step time of the same run."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
P, G, STEPS, WARMUP = 4, 8, 6, 1


def test_simulated_step_time_is_within_25_percent_of_a_real_async_run(tmp_path):
    speeds = tmp_path / "throughputs.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    bench = subprocess.run(
        [sys.executable, str(REPO / "scripts/bench_rl.py"), "--sides", "ours-async", "--rounds", "1",
         "--steps", str(STEPS), "--warmup", str(WARMUP), "--group-size", str(G), "--prompts-per-step", str(P),
         "--max-new-tokens", "64",
         "--max-lag", "1", "--throughputs-out", str(speeds)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1500)
    assert bench.returncode == 0, (bench.stdout + bench.stderr)[-4000:]
    measured = json.loads(speeds.read_text())
    for key in ("gen_tokens_per_s", "seq_tokens_per_s", "train_tokens_per_s", "push_s", "lengths", "prompt_len"):
        assert measured.get(key), key
    sim_out = tmp_path / "simulated.json"
    sim = subprocess.run(
        [sys.executable, str(REPO / "scripts/simulate_layout.py"), "--throughputs", str(speeds), "--layouts", "1+1",
         "--max-lag", "1", "--prompts-per-step", str(P), "--group-size", str(G), "--steps", str(WARMUP + STEPS),
         "--json", str(sim_out)], capture_output=True, text=True, env=env, timeout=300)
    assert sim.returncode == 0, sim.stderr[-3000:]
    predicted = json.loads(sim_out.read_text())["rows"][0]["step_s"]
    real = statistics.fmean(measured["measured_step_s"])
    assert abs(predicted - real) / real < 0.25, \
        f"simulated {predicted:.2f} s/step, measured {real:.2f} s/step; {sim.stdout}"
