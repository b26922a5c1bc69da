"""One colocated vLLM engine per training process, and the memory hand-off, through `qed-fit` on the CPU build.

Two processes (DDP and FSDP2 over gloo, Lightning's own launcher): each rank creates its in-process vLLM CPU engine
exactly as a GPU rank does (`rollout.launch`: vLLM's `external_launcher` executor, told the rank's RANK/LOCAL_RANK;
on GPU the same code puts each engine on its rank's device). `EngineProbe` (a test callback) records, per rank,
how the engine was created and driven. Checked: both ranks' engines exist in their own processes with their own rank
settings, both generate, and both receive the new weights after every step: the step's largest |trainer - sampler|
log-prob gap, maxed over ranks, stays below 1e-4 (measured ~1e-6), while an engine left on the old weights would
be off by ~1e-2 after one step at lr 1e-3 (`test_engines.py` checks that size).
The hand-off (gradients freed, allocator cache emptied, sleep, wake weights -> reload -> wake KV cache) runs after
every step; on CPU its vLLM calls are no-ops, and the run's results are those of a run without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from runs import REPO, read_metrics, run_process, series, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STEPS = 3
PROBE = "engine_probe.EngineProbe"


def _fit(tiny: Path, root: Path, *args: str, handoff: bool = True) -> list[dict[str, float]]:
    cmd = [sys.executable, "-m", "qed_lightning.cli", "--config", str(REPO / "configs/demo/rl.yaml"), *args,
           "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(STEPS),
           "--trainer.callbacks", f"[{PROBE}]",
           "--trainer.enable_checkpointing", "false", "--model.init_args.export_hf", "false",
           "--model.init_args.model_name_or_path", str(tiny), "--model.init_args.max_new_tokens", "16",
           "--model.init_args.engine.init_args.enable_sleep_mode", str(handoff).lower(),
           "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
           "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"), "--data.init_args.val_size", "0"]
    log = root.with_suffix(".log")
    env = subprocess_env(PYTHONPATH=f"{REPO / 'src'}:{Path(__file__).parent}")  # EngineProbe lives next to this file
    assert run_process(cmd, log, timeout=900, env=env) == 0, log.read_text()[-4000:]
    return read_metrics(root)


def _probes(root: Path) -> list[dict]:
    return [json.loads((root / f"engine-rank{r}.json").read_text())
            for r in range(len(list(root.glob("engine-rank*.json"))))]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_each_rank_drives_its_own_engine_which_follows_its_trainer(strategy, tiny_model_dir, tmp_path):
    root = tmp_path / strategy
    rows = _fit(tiny_model_dir, root, "--config", str(REPO / f"configs/strategy/{strategy}.yaml"),
                "--trainer.devices", "2",
                "--data.init_args.prompts_per_step", "4")
    probes = _probes(root)
    assert [p["trainer_rank"] for p in probes] == [0, 1]
    assert probes[0]["pid"] != probes[1]["pid"]  # one engine per process, created in that process
    for rank, probe in enumerate(probes):
        assert probe["backend"] == "external_launcher" and probe["executor"] == "ExecutorWithExternalLauncher"
        # the settings vLLM's worker took: this rank, this rank's local index (the GPU index on a GPU), own TP group
        assert (probe["launch_rank"], probe["worker_rank"], probe["worker_local_rank"]) == (rank, rank, rank)
        assert probe["launch_world"] == 2 and probe["tp_group"] == [rank]
        assert probe["policy_version"] == STEPS  # each rank's engine received every push
        assert probe["handoff_counts"] == {"sleep": STEPS, "wake": 2 * STEPS}  # weights, then KV cache, per push
    # both ranks generated: 2 ranks x 2 prompts x G=4 graded each step (by the judge, or 0 without a proof)
    assert [a + b for a, b in zip(series(rows, "judge/ok"), series(rows, "judge/truncated"))] == [16.0] * STEPS
    assert series(rows, "rollout/policy_version") == [1.0, 2.0, 3.0]
    gaps = series(rows, "rollout/logprob_diff_max")  # the largest gap of either rank's samples
    assert len(gaps) == STEPS and max(gaps) < 1e-4, gaps
    assert series(rows, "memory/handoff") == [1.0] * STEPS


def test_the_handoff_runs_every_step_and_leaves_the_run_unchanged(tiny_model_dir, tmp_path):
    on = _fit(tiny_model_dir, tmp_path / "on", handoff=True)
    off = _fit(tiny_model_dir, tmp_path / "off", handoff=False)
    assert series(on, "memory/handoff") == [1.0] * STEPS and series(off, "memory/handoff") == []
    assert _probes(tmp_path / "on")[0]["handoff_counts"] == {"sleep": STEPS, "wake": 2 * STEPS}
    assert _probes(tmp_path / "off")[0]["handoff_counts"] == {"sleep": 0, "wake": 0}
    assert _probes(tmp_path / "on")[0]["backend"] is None  # a lone CPU process keeps vLLM's uni-process executor
    for key in ("train/loss", "train/grad_norm", "rollout/reward_mean", "rollout/logprob_diff_max"):
        assert series(on, key) == series(off, key), key
    assert len(set(series(on, "train/loss"))) == STEPS  # three different steps, not a constant
