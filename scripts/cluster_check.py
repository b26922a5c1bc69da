"""Cluster check of colocated vLLM rollouts on 2 GPUs: per-rank engines, the memory hand-off, weight reloads, the
bf16 sampler-vs-trainer log-prob gap, generation tokens/s, and RL steps under FSDP2. Prints one JSON.

    bash scripts/cluster_check.sh                 # on a node with >= 2 GPUs and vLLM's CUDA build installed
    python scripts/cluster_check.py prepare OUT   # 1. the ~0.3B random Qwen3 of gpu_check.py (nothing downloaded)
    torchrun --standalone --nproc_per_node 2 -m qed_lightning.cli --config ... --trainer.callbacks+=cluster_check.Probe
    python scripts/cluster_check.py report OUT    # 3. read the run back, check, print the JSON

Step 2 is a real `qed-fit` run (configs/demo/rl.yaml + configs/strategy/fsdp2.yaml, bf16, 2 processes started by
torchrun, which Lightning joins), with `VLLMEngine(enable_sleep_mode=True, sleep_level=2)` in each rank and the
scripted judge. `Probe` records per rank, at the start of training, how the engine was created (vLLM executor, the
rank settings its worker took, the worker's device) and whether the trainer's CUDA device survived the engine's
creation, and at the end the engine's sleep/wake counts. The report checks:
- `per_rank_engines`: 2 engines, `external_launcher`, worker rank r on `cuda:r`, trainer still on `cuda:r`;
- `handoff`: every step slept and woke in stages (sleeps = steps, wakes = 2 x steps), `memory/handoff` logged;
- `reload`: each engine's policy version is the last step (every push reached both engines);
- `logprob_gap`: the largest |trainer - sampler| log-prob of any sampled token (bf16 on both sides) below
  `--max-gap` (default 0.5; bf16 kernels differ, the mean is reported as well);
- `trained`: every step has a finite loss and a positive gradient norm.
Exit status 0 when every check passes.

`--cpu` (`CLUSTER_CHECK_CPU=1 bash scripts/cluster_check.sh`) runs the same three steps on 2 CPU processes with the
tiny model and vLLM's CPU build: a dry run of the script, its torchrun launch and its checks (sleep mode is a no-op
there, the devices are "cpu"), not a measurement.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
PROMPTS, GROUP, RANKS = 8, 8, 2  # per rank per step: 8 prompts x G=8 samples, on 2 ranks


class Probe(Callback):
    """Write `<default_root_dir>/probe-rank<R>.json`: the engine's launch, its worker's rank settings and device,
    and the trainer's device, after the engine started; its sleep/wake counts at the end."""

    def _record(self, trainer, update: dict) -> None:
        path = Path(trainer.default_root_dir, f"probe-rank{trainer.global_rank}.json")
        record = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**record, **update}))

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        engine = pl_module.engine
        worker = engine.llm.llm_engine.model_executor.driver_worker.worker
        cuda = torch.cuda.is_available()
        free, total = torch.cuda.mem_get_info() if cuda else (0, 0)
        self._record(trainer, {
            "rank": trainer.global_rank, "backend": engine.launch.backend, "worker_rank": worker.rank,
            "worker_local_rank": worker.local_rank, "worker_device": str(worker.device),
            "trainer_device": str(pl_module.device), "current_device": torch.cuda.current_device() if cuda else None,
            "free_gib_at_start": free / 2**30, "total_gib": total / 2**30,
        })

    def on_train_end(self, trainer, pl_module) -> None:
        engine = pl_module.engine
        self._record(trainer, {"handoff_counts": engine.handoff_counts, "policy_version": engine.policy_version})


def fit_args(model: Path, root: Path, steps: int, cpu: bool = False) -> list[str]:
    """The `qed-fit` arguments of step 2 (cluster_check.sh passes them to torchrun)."""
    engine = {"class_path": "qed_lightning.rollout.VLLMEngine", "init_args": {
        "dtype": "float32" if cpu else "bfloat16", "max_model_len": 4096, "gpu_memory_utilization": 0.1 if cpu else 0.3,
        "enforce_eager": cpu, "enable_sleep_mode": True, "sleep_level": 2}}
    device = (["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.init_args.dtype", "float32",
               "--model.init_args.max_new_tokens", "16"] if cpu else
              ["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-true",
               "--model.init_args.dtype", "bfloat16",
               "--model.init_args.max_new_tokens", "512"])
    return ["--config", str(REPO / "configs/demo/rl.yaml"), "--config", str(REPO / "configs/strategy/fsdp2.yaml"),
            *device,
            "--trainer.devices", "2", "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root),
            "--trainer.val_check_interval", "1",
            "--trainer.callbacks", "[]", "--trainer.callbacks+=cluster_check.Probe", "--trainer.enable_checkpointing",
            "false", "--trainer.enable_progress_bar", "false", "--model.init_args.model_name_or_path", str(model),
            "--model.init_args.export_hf", "false", "--model.init_args.group_size", str(GROUP),
            "--model.init_args.optimizer.init_args.lr", "1e-5", "--model.init_args.engine", json.dumps(engine),
            "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
            "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"), "--data.init_args.val_size", "0",
            "--data.init_args.prompts_per_step", str(PROMPTS)]


def prepare(out: Path, cpu: bool = False) -> Path:
    """The model of the check: gpu_check.py's ~0.3B random Qwen3 (bf16), or with `cpu` the tiny test model."""
    if cpu:
        from qed_lightning.tools.tiny import build_tiny

        return build_tiny(out / "model", preset="test", seed=0)
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_check import build_model

    model, n_params = build_model(out / "model")
    print(f"cluster_check: model {n_params / 1e6:.0f}M parameters in {model}", file=sys.stderr)
    return model


def _series(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def report(root: Path, steps: int, max_gap: float, cpu: bool = False) -> dict:
    """Read the run's metrics and probes back and check them (see the module docstring)."""
    (run_dir,) = sorted((root / "csv").glob("version_*"))
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    probes = [json.loads(p.read_text()) for p in sorted(root.glob("probe-rank*.json"))]
    gaps, means = _series(rows, "rollout/logprob_diff_max"), _series(rows, "rollout/logprob_diff_mean")
    samples = RANKS * PROMPTS * GROUP
    generated = [n * samples / t
                 for n, t in zip(_series(rows, "rollout/response_len_mean"), _series(rows, "time/generate_s"))]
    losses, norms = _series(rows, "train/loss"), _series(rows, "train/grad_norm")
    checks = {
        "per_rank_engines": len(probes) == RANKS and all(
            p["backend"] == "external_launcher" and p["worker_rank"] == p["rank"] == p["worker_local_rank"]
            and p["worker_device"] == p["trainer_device"] == ("cpu" if cpu else f"cuda:{p['rank']}")
            and p["current_device"] == (None if cpu else p["rank"]) for p in probes),
        "handoff": all(p["handoff_counts"] == {"sleep": steps, "wake": 2 * steps} for p in probes)
        and _series(rows, "memory/handoff") == [1.0] * steps,
        "reload": all(p["policy_version"] == steps for p in probes),
        "logprob_gap": len(gaps) == steps and max(gaps) < max_gap,
        "trained": len(losses) == steps and all(math.isfinite(x) for x in losses) and min(norms, default=0) > 0,
    }
    return {
        "ok": all(checks.values()), "checks": checks, "ranks": probes,
        "logprob_gap_max": gaps, "logprob_gap_mean": means,
        "generate_tokens_per_s": generated,  # samples of both ranks x their mean length / the slower rank's time
        "wake_s": _series(rows, "rollout/wake_s"), "sync_time_s": _series(rows, "rollout/sync_time_s"),
        "memory_freed_gib": _series(rows, "memory/freed_gib"),
        "memory_device_free_gib": _series(rows, "memory/device_free_gib"),
        "memory_reserved_gib": _series(rows, "memory/reserved_gib"), "train_loss": losses, "grad_norm": norms,
        "step_s": [a + b + c for a, b, c in zip(_series(rows, "time/generate_s"), _series(rows, "time/grade_s"),
                                                _series(rows, "time/train_s"))],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["prepare", "args", "report"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-gap", type=float, default=0.5)
    parser.add_argument("--cpu", action="store_true", help="dry run on 2 CPU processes (tiny model, vLLM CPU build)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.command == "prepare":
        print(prepare(out, args.cpu))
    elif args.command == "args":  # one argument a line, for the shell script
        print("\n".join(fit_args(out / "model", out / "run", args.steps, args.cpu)))
    else:
        result = report(out / "run", args.steps, args.max_gap, args.cpu)
        print(json.dumps(result, indent=1))
        return 0 if result["ok"] else 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
