#!/usr/bin/env python3
"""Simulate RL training layouts (colocated vs disaggregated, max_lag 0/1/2) from measured component speeds.

    python scripts/simulate_layout.py                                   # the paper's cluster, assumed speeds below
    python scripts/simulate_layout.py --throughputs runs/bench/throughputs.json --lengths runs/rl/rollouts
    python scripts/simulate_layout.py --devices 32 --layouts colocated:32 8+24 24+8 --max-lag 0 1 2

Prints, per layout and max_lag: seconds per step (steady state), steps/hour, the idle share of generating and training
devices, the policy lag of the trained samples and the groups dropped as stale. The model is in
`qed_lightning.tools.layout_sim` (processor-sharing decode with a per-sequence speed cap and a KV-cache bound, streamed
grading, trainer waits for its push).

Default speeds (`--throughputs` replaces them; `scripts/bench_rl.py --throughputs-out` writes a file for a CPU run,
with that run's completion lengths and mean prompt length, used unless `--lengths` / `--prompt-len` are given)
are assumptions for Qwen3-4B in bf16 on H100s, not measurements: decode 4,000 tokens/s per GPU at full batch and
150 tokens/s for one sequence, 32 sequences per GPU (the KV cache of ~20k-token proofs: 144 KiB a token), training
5,000 tokens/s per GPU (4B parameters with recomputation and attention at ~25k tokens: ~70 GFLOP a token at ~40%
of 989 TFLOP/s), judge 60 s a call with 256 at once, weight push 5 s (8 GB in bf16). Default completion lengths are
log-normal with median 12,000 tokens and sigma 0.9, capped at 49,152 (`--lengths` reads a run's rollout records or
`qed-eval` samples instead: every `completion_len`/`completion_tokens`/`output_tokens` field found).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import asdict, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qed_lightning.tools.layout_sim import Layout, Throughputs, Workload, simulate  # noqa: E402

PAPER_SPEEDS = Throughputs(gen_tokens_per_s=4000, seq_tokens_per_s=150, max_seqs_per_device=32,
                           train_tokens_per_s=5000, judge_latency_s=60.0, judge_concurrency=256, push_s=5.0,
                           prefill_tokens_per_s=20000)
LENGTH_KEYS = ("completion_len", "completion_tokens", "output_tokens")


def lognormal_lengths(median: float, sigma: float, cap: int, n: int = 4096, seed: int = 0) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(min(cap, max(1, round(math.exp(math.log(median) + sigma * rng.gauss(0, 1))))) for _ in range(n))


def lengths_from(path: Path) -> tuple[int, ...]:
    """Completion lengths from JSONL files (a file, or every *.jsonl under a folder)."""
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    found = []
    for file in files:
        for line in file.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            found.extend(int(row[k]) for k in LENGTH_KEYS if isinstance(row.get(k), int | float))
    if not found:
        sys.exit(f"simulate_layout: no {'/'.join(LENGTH_KEYS)} field in {path}")
    return tuple(found)


def parse_layout(spec: str, lag: int) -> Layout:
    """`colocated:N` or `G+T` (G generating, T training devices)."""
    if spec.startswith("colocated:"):
        n = int(spec.split(":", 1)[1])
        return Layout(f"colocated {n}", n, n, colocated=True, max_lag=0)
    gen, train = (int(x) for x in spec.split("+"))
    return Layout(f"{gen} gen + {train} train", gen, train, max_lag=lag)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", default=["colocated:8", "8+8", "24+8"], help="colocated:N or GEN+TRAIN")
    p.add_argument("--max-lag", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--throughputs", type=Path,
                   help="JSON with Throughputs fields (default: the paper-scale assumptions)")
    p.add_argument("--lengths", type=Path, help="rollout records / eval samples (JSONL file or folder)")
    p.add_argument("--median", type=float, default=12000), p.add_argument("--sigma", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=int, default=49152)
    p.add_argument("--prompts-per-step", type=int, default=64), p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--prompt-len", type=float, help="prompt tokens (default: the throughputs file's, else 300)")
    p.add_argument("--steps", type=int, default=12), p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    speeds, measured = PAPER_SPEEDS, {}
    if args.throughputs:
        measured = json.loads(args.throughputs.read_text())
        known = {f.name for f in fields(Throughputs)}
        speeds = Throughputs(**{k: v for k, v in measured.items() if k in known})
    if args.lengths:
        lengths = lengths_from(args.lengths)
    elif measured.get("lengths"):
        lengths = tuple(int(n) for n in measured["lengths"])
    else:
        lengths = lognormal_lengths(args.median, args.sigma, args.max_new_tokens)
    prompt_len = args.prompt_len if args.prompt_len is not None else measured.get("prompt_len", 300)
    work = Workload(args.prompts_per_step, args.group_size, lengths, prompt_len, args.steps, args.seed)
    rows = []
    for spec in args.layouts:
        for lag in ([0] if spec.startswith("colocated:") else args.max_lag):
            layout = parse_layout(spec, lag)
            r = simulate(layout, speeds, work)
            rows.append({"layout": layout.name, "max_lag": lag, "step_s": r.mean_step_s,
                         "steps_per_hour": r.steps_per_hour,
                         "gen_idle": r.gen_idle, "train_idle": r.train_idle, "lag": r.lag_histogram(),
                         "stale_dropped": r.stale_dropped})
    print(f"{'layout':<22} {'lag':>3} {'s/step':>8} {'steps/h':>8} {'gen idle':>8} {'train idle':>10}  "
          "lag shares (stale groups)")
    for row in rows:
        lag = " ".join(f"{k}:{v:.2f}" for k, v in row["lag"].items())
        print(f"{row['layout']:<22} {row['max_lag']:>3} {row['step_s']:>8.1f} {row['steps_per_hour']:>8.2f} "
              f"{row['gen_idle']:>8.0%} {row['train_idle']:>10.0%}  {lag} ({row['stale_dropped']})")
    if args.json:
        args.json.write_text(json.dumps({"throughputs": asdict(speeds), "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
