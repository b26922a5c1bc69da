#!/usr/bin/env python3
"""RL throughput: our `RubricRLModule` (through `qed-fit`), sequential and asynchronous, against TRL's `GRPOTrainer`.

What is measured: RL steps per second, one step = generate `prompts x G` rollouts, grade them, one optimizer step
(plus, on our side, the weight push). The clock runs from the end of the warm-up step(s) to the end of the last
step, so it holds everything each trainer does per step. Also: steps per CPU-second of the side's whole process tree
(its vLLM server included; the ratio to prefer on a loaded machine), seconds per step of each phase (ours: `time/*`
and `rollout/sync_time_s`; TRL: its `_generate_single_turn` and `_calculate_rewards`, wrapped), generation and
training as a share of the machine's GEMM peak (`bench_rl_async`), the policy-lag shares of the async side's
trained samples, peak RSS, and the 1-minute load average at the end of each run.

Sides (each in its own subprocess; the order reverses every other round):
- ours-vllm (ours-sync): configs/demo/rl.yaml with `VLLMEngine` (in-process), `--threads` threads;
- ours-async: the same plus configs/layout/one_node_async.yaml's engine: a vLLM server on core 1, the trainer on
  core 0 (one thread each), groups streamed, `--max-lag`, `--update-mode`; `--throughputs-out` writes the layout
  simulator's inputs measured on this run (tests/integration/test_layout_sim_check.py checks the prediction);
- ours-hf: `HFEngine` (transformers `generate` on the shared policy module);
- trl: `GRPOTrainer` (transformers `generate`, TRL's default without vLLM), `--threads` threads. TRL 1.16's
  experimental `AsyncGRPOTrainer` is not a side: it cannot run on a CPU. Tried against a CPU vLLM server: its
  weight sync is NCCL-only (a checkpoint transfer can be injected through `weight_transfer`), its `__init__` calls
  `torch.cuda.get_device_name` unconditionally (`get_peak_flops_per_device`; patchable), and its rollout worker
  needs a chat template it recognises to parse responses (`add_response_schema` refuses the tiny model's).
Same on all sides: the model folder (float32, CPU), the chat-templated policy prompt of each problem of
data/samples/fineproofs_rl.jsonl (TRL's tokenization gives the same ids), G, prompts per step, max new tokens,
temperature 0.8, top_p 1, AdamW (lr, weight decay 0.01, constant LR), grad-norm clip 0.3, entropy bonus 1e-4, no KL,
one optimizer step per generation batch, no eval, no checkpoints, local logging only.

Fairness caveats:
- Reward: ours goes through the real judge path (rubric prompt, local HTTP to the scripted server, parsing, a fresh
  SQLite cache per run); TRL calls the same `ScoringRule` in-process. That favours TRL.
- Training pass: ours uses `--layout` (default "auto" = on CPU "shared_prefix": each prompt once per micro-batch,
  its G completions attending to its cached keys/values; "padded" = one row per rollout, the same work as TRL's,
  which pads prompts x G rows and recomputes each prompt G times).
- vLLM needs start-up time (outside the clock) and a weight push per step (inside it). The loss aggregation differs
  (ours: the paper's token sum / sequences; TRL: dr_grpo), same cost.
- Threads: sync sides get `--threads` torch/OpenMP threads (vLLM with VLLM_CPU_OMP_THREADS_BIND=nobind). On a
  machine busy with other jobs, OpenMP threads spin-wait on descheduled siblings (measured at load ~6 on 2 cores:
  one `generate` took 22 s with 2 threads, 2.2 s with 1), so `--threads 2` numbers from a loaded machine understate
  the sync sides; prefer the per-CPU-second ratios there. The async side never runs more than one thread per core.

How to read: "ratio a/b" = median steps/s of a over b (> 1: a faster), also per CPU-second. Targets (issue 15):
ours-async / trl >= 2.5 at G=16 and >= 2 at G=8, ours-async / ours-vllm >= 1.4.
Usage: .venv/bin/python scripts/bench_rl.py --threads 2 [--rounds 2] [--steps 6] [--group-size 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rl_async as extra  # noqa: E402  (the async side, CPU seconds, GEMM peak, simulator inputs)

MARKER = "BENCH_RESULT "
SIDES = ("ours-vllm", "ours-async", "ours-hf", "trl")
RULE = dict(name="char_fraction", charset="aeiouAEIOU")  # the demo config's scripted judge rule
ENGINES = {
    "ours-vllm": {"class_path": "qed_lightning.rollout.VLLMEngine",
                  "init_args": {"max_model_len": 2048, "gpu_memory_utilization": 0.1}},
    "ours-hf": {"class_path": "qed_lightning.rollout.HFEngine", "init_args": {"batch_size": 64}},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: build the 'bench' tiny preset into a temp dir)")
    p.add_argument("--data", default=str(ROOT / "data/samples/fineproofs_rl.jsonl"), help="problems + rubrics")
    p.add_argument("--group-size", type=int, default=8, help="G, rollouts per prompt")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro-batch-tokens", type=int, default=4096, help="ours: tokens per packed training row")
    p.add_argument("--layout", default="auto", choices=["auto", "padded", "shared_prefix"],
                   help="ours: model.micro_batch_layout (auto = shared_prefix on CPU)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=6, help="timed RL steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed RL steps before the timed ones")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OpenMP threads of every side (1 is robust on a shared machine; see the docstring)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=["ours-vllm", "ours-async", "trl"])
    p.add_argument("--max-lag", type=int, default=1, help="ours-async: the layout's max_lag")
    p.add_argument("--update-mode", default="wait", choices=["wait", "keep"],
                   help="ours-async: in-flight weight pushes")
    p.add_argument("--throughputs-out", help="ours-async: write the layout simulator's inputs (measured) to this JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write settings and results to this file")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side, print JSON
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- measurement -------------------------------------------------------------------------------------------------


def finish(side: str, args: argparse.Namespace, ticks: list[tuple[float, float]], phases: dict[str, list[float]],
           gen_tokens: list[int]) -> dict:
    """ticks[i] = (wall, CPU seconds of the process tree) at the end of step i (ticks[0] = start of training);
    phases/gen_tokens: one entry per step."""
    import torch

    w, n = args.warmup, args.steps
    if len(ticks) != w + n + 1:
        raise RuntimeError(f"{side}: recorded {len(ticks) - 1} steps, expected {w + n}")
    seconds = ticks[w + n][0] - ticks[w][0]
    cpu_seconds = ticks[w + n][1] - ticks[w][1]
    rollouts = args.prompts_per_step * args.group_size * n
    result = {"side": side, "steps_per_s": n / seconds, "rollouts_per_s": rollouts / seconds, "seconds": seconds,
              "steps_per_cpu_s": n / cpu_seconds, "step_s": [b[0] - a[0] for a, b in zip(ticks[w:], ticks[w + 1:])],
              "gen_tokens_per_s": sum(gen_tokens[w:w + n]) / seconds,
              "mean_completion_len": sum(gen_tokens[w:w + n]) / rollouts,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load_1m": os.getloadavg()[0],
              "threads": "1+1" if side == "ours-async" else str(torch.get_num_threads())}
    for name, values in phases.items():
        result[f"{name}_s_per_step"] = sum(values[w:w + n]) / n
    return result


def csv_series(root: Path, key: str) -> list[float]:
    (metrics,) = sorted((root / "csv").glob("version_*/metrics.csv"))
    with open(metrics) as fh:
        return [float(row[key]) for row in csv.DictReader(fh) if row.get(key)]


# -- our side ----------------------------------------------------------------------------------------------------


def _step_timer_class():
    import lightning as L

    class StepTimer(L.Callback):
        """Ticks (wall, CPU seconds) at each step's start (= after the previous step's weight sync) and once when
        training ends."""

        ticks: list[tuple[float, float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            StepTimer.ticks.append((time.perf_counter(), extra.tree_cpu_seconds()))

        def on_train_end(self, trainer, pl_module) -> None:
            StepTimer.ticks.append((time.perf_counter(), extra.tree_cpu_seconds()))

    return StepTimer


StepTimer = AsyncProbe = None  # defined in the --side subprocess (lightning is not imported by the driver)


def ours_cli_args(args: argparse.Namespace, root: Path) -> list[str]:
    overrides = {
        "seed_everything": args.seed, "trainer.default_root_dir": root, "trainer.max_steps": args.warmup + args.steps,
        "trainer.enable_checkpointing": "false", "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
        "trainer.callbacks": json.dumps([{"class_path": "__main__.StepTimer"}, {"class_path": "__main__.AsyncProbe"}]),
        "model.init_args.model_name_or_path": args.model, "model.init_args.export_hf": "false",
        "model.init_args.engine": json.dumps(extra.async_engine(args.max_lag, args.update_mode)
                                             if args.side == "ours-async" else ENGINES[args.side]),
        "model.init_args.group_size": args.group_size,
        "model.init_args.max_new_tokens": args.max_new_tokens, "model.init_args.temperature": 0.8,
        "model.init_args.top_p": 1.0, "model.init_args.micro_batch_tokens": args.micro_batch_tokens,
        "model.init_args.micro_batch_layout": args.layout,
        "model.init_args.optimizer.init_args.lr": args.lr,
        "model.init_args.judge.init_args.cache_path": root / "grades.sqlite",  # fresh per run: no cache hits
        "data.init_args.path": args.data, "data.init_args.prompts_per_step": args.prompts_per_step,
        "data.init_args.val_size": 0,
    }
    return ["--config", str(ROOT / "configs/demo/rl.yaml"), *(f"--{k}={v}" for k, v in overrides.items())]


def run_ours(args: argparse.Namespace) -> dict:
    global StepTimer, AsyncProbe
    from qed_lightning.cli import make_cli

    StepTimer, AsyncProbe = _step_timer_class(), extra.probe_class()
    AsyncProbe.out = args.throughputs_out if args.side == "ours-async" else None
    root = Path(tempfile.mkdtemp(prefix=f"bench_rl_{args.side}_", dir=args.workdir))
    make_cli(args=ours_cli_args(args, root))
    ticks = StepTimer.ticks  # [start of step 0, start of step 1 (= end of step 0, after its sync), ..., end]
    phases = {k: csv_series(root, f"time/{k}_s") for k in ("generate", "grade", "wait", "train")}
    phases["sync"] = csv_series(root, "rollout/sync_time_s")
    group = args.prompts_per_step * args.group_size
    gen_tokens = [round(x * group) for x in csv_series(root, "rollout/response_len_mean")]
    result = finish(args.side, args, ticks, phases, gen_tokens)
    if args.side == "ours-async":
        w = args.warmup
        lags = {k: csv_series(root, f"rollout/policy_lag_frac_{k}")[w:] for k in range(args.max_lag + 1)}
        result["lag_shares"] = {k: sum(v) / len(v) for k, v in lags.items() if v}
        result["stale_dropped"] = sum(csv_series(root, "rollout/stale_dropped")[w:])
        if args.throughputs_out:
            data = extra.throughputs(AsyncProbe.record, phases, csv_series(root, "judge/latency_mean_s"), w)
            extra.write_throughputs(args.throughputs_out, {**data, "measured_step_s": result["step_s"],
                                                           "prompts_per_step": args.prompts_per_step,
                                                           "group_size": args.group_size, "max_lag": args.max_lag})
    return result


# -- TRL side ----------------------------------------------------------------------------------------------------


def scripted_reward():
    """TRL reward function: the scripted judge's rule on the text our judge would grade, in-process (no HTTP)."""
    from qed_lightning.rewards.parsing import extract_proof
    from qed_lightning.testing import ScoringRule

    rule = ScoringRule(**RULE)

    def char_fraction_reward(completions, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        proofs = [extract_proof(t) or t.strip() for t in texts]  # as RubricJudge with require_think_close=False
        return [rule(p) / 7 if p else 0.0 for p in proofs]

    return char_fraction_reward


def trl_config(args: argparse.Namespace, out_dir: str):
    from trl import GRPOConfig

    batch = args.prompts_per_step * args.group_size
    return GRPOConfig(
        output_dir=out_dir, max_steps=args.warmup + args.steps, seed=args.seed, use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens, temperature=0.8, top_p=1.0,
        learning_rate=args.lr, optim="adamw_torch", weight_decay=0.01, lr_scheduler_type="constant",
        max_grad_norm=0.3, beta=0.0, epsilon=4.0, epsilon_high=4.0, scale_rewards="none", loss_type="dr_grpo",
        entropy_coef=1e-4, gradient_checkpointing=False, report_to="none", save_strategy="no", eval_strategy="no",
        logging_strategy="steps", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from trl import GRPOTrainer

    from qed_lightning.data.rl import POLICY_PROMPT

    ticks: list[tuple[float, float]] = []
    phases: dict[str, list[float]] = {"generate": [], "grade": []}
    gen_tokens: list[int] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **kw) -> None:
            ticks.append((time.perf_counter(), extra.tree_cpu_seconds()))

        def on_step_end(self, *a, **kw) -> None:
            ticks.append((time.perf_counter(), extra.tree_cpu_seconds()))

    def timed(fn, name: str, count: bool = False):
        def wrapped(*a, **kw):
            start = time.perf_counter()
            out = fn(*a, **kw)
            phases[name].append(time.perf_counter() - start)
            if count:
                gen_tokens.append(sum(len(ids) for ids in out[0]))
            return out
        return wrapped

    set_seed(args.seed)
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [[{"role": "user", "content": POLICY_PROMPT.replace("{problem}", r["problem"])}] for r in rows]
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), reward_funcs=scripted_reward(),
        args=trl_config(args, tempfile.mkdtemp(prefix="bench_rl_trl_", dir=args.workdir)),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=AutoTokenizer.from_pretrained(args.model), callbacks=[StepTimer()],
    )
    trainer._generate_single_turn = timed(trainer._generate_single_turn, "generate", count=True)
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "grade")
    trainer.train()
    return finish("trl", args, ticks, phases, gen_tokens)


# -- driver ------------------------------------------------------------------------------------------------------


def run_side(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = run_trl(args) if args.side == "trl" else run_ours(args)
    print(MARKER + json.dumps(result), flush=True)


def spawn(args: argparse.Namespace, side: str, workdir: Path) -> dict:
    flags = ["--model", args.model, "--data", args.data, "--group-size", args.group_size, "--prompts-per-step",
             args.prompts_per_step, "--max-new-tokens", args.max_new_tokens, "--micro-batch-tokens",
             args.micro_batch_tokens, "--layout", args.layout, "--lr", args.lr, "--steps", args.steps,
             "--warmup", args.warmup,
             "--threads", args.threads, "--seed", args.seed, "--side", side, "--workdir", workdir,
             "--max-lag", args.max_lag, "--update-mode", args.update_mode]
    if args.throughputs_out:
        flags += ["--throughputs-out", args.throughputs_out]
    threads = str(args.threads)  # nobind: vLLM keeps these threads instead of binding one per core
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *map(str, flags)], capture_output=True, text=True, cwd=workdir,
                          env=env)
    found = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        sys.exit(f"--side {side} failed (exit {proc.returncode}); last output:\n{tail}")
    return {**json.loads(found[-1][len(MARKER):]), "process_s": time.perf_counter() - started}


def summarize(runs: list[dict]) -> dict:
    """Median steps/s and steps per CPU-second of each side, and their ratios: every side against TRL, and
    ours-async against ours-vllm (the issue's targets: >= 2.5x TRL at G=16, >= 2x at G=8, >= 1.4x ours-sync)."""
    sides = list(dict.fromkeys(r["side"] for r in runs))
    median = {s: statistics.median(r["steps_per_s"] for r in runs if r["side"] == s) for s in sides}
    per_cpu = {s: statistics.median(r["steps_per_cpu_s"] for r in runs if r["side"] == s) for s in sides}
    pairs = [(s, "trl") for s in sides if s != "trl" and "trl" in median]
    if {"ours-async", "ours-vllm"} <= set(sides):
        pairs.append(("ours-async", "ours-vllm"))
    ratios = {f"{a}/{b}": median[a] / median[b] for a, b in pairs}
    cpu_ratios = {f"{a}/{b}": per_cpu[a] / per_cpu[b] for a, b in pairs}
    return {"median_steps_per_s": median, "median_steps_per_cpu_s": per_cpu, "ratios": ratios,
            "ratios_per_cpu_s": cpu_ratios}


def peak_shares(runs: list[dict], args: argparse.Namespace, peak: float, flops: float, prompt_len: float) -> None:
    """Add each run's generation and training GFLOP/s as a share of the GEMM peak of the cores that phase used
    (see bench_rl_async): sync sides use `--threads` cores for both; ours-async generates on 1 core all the time
    (its share is over the wall clock) and trains on the other."""
    for r in runs:
        cores = 1 if r["side"] == "ours-async" else args.threads
        gen_tokens = r["gen_tokens_per_s"] / r["steps_per_s"]  # per step
        gen_s = 1 / r["steps_per_s"] if r["side"] == "ours-async" else r.get("generate_s_per_step", 0.0)
        train_s = r.get("train_s_per_step") or (
            1 / r["steps_per_s"] - r.get("generate_s_per_step", 0.0) - r.get("grade_s_per_step", 0.0))
        useful = args.prompts_per_step * prompt_len + gen_tokens  # each prompt once, every completion token
        r["gen_peak_share"] = gen_tokens * flops / max(gen_s, 1e-9) / (peak * 1e9 * cores) if gen_s else 0.0
        r["train_peak_share"] = useful * 3 * flops / max(train_s, 1e-9) / (peak * 1e9 * cores)


def report(runs: list[dict], summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ["side", "round", "steps/s", "steps/CPU-s", "s/step", "gen s", "grade s", "wait s", "train s", "sync s",
            "mean len", "gen %peak", "train %peak", "lag shares", "RSS MiB", "threads", "load 1m"]
    table = Table(title="RL throughput (timed steps only; phase columns are seconds per step)")
    for c in cols:
        table.add_column(c, justify="left" if c in ("side", "lag shares") else "right")
    for r in runs:
        phase = lambda k: f"{r[k]:.2f}" if r.get(k) else "-"  # noqa: E731
        lags = " ".join(f"{k}:{v:.2f}" for k, v in r.get("lag_shares", {}).items()) or "0:1.00"
        table.add_row(r["side"], str(r["round"]), f"{r['steps_per_s']:.3f}", f"{r['steps_per_cpu_s']:.3f}",
                      f"{1 / r['steps_per_s']:.2f}", phase("generate_s_per_step"), phase("grade_s_per_step"),
                      phase("wait_s_per_step"), phase("train_s_per_step"), phase("sync_s_per_step"),
                      f"{r['mean_completion_len']:.1f}", f"{100 * r['gen_peak_share']:.0f}%",
                      f"{100 * r['train_peak_share']:.0f}%", lags, f"{r['peak_rss_mib']:.0f}", str(r["threads"]),
                      f"{r['load_1m']:.1f}")
    console = Console(width=200)
    console.print(table)
    med = ", ".join(f"{s} {v:.3f}" for s, v in summary["median_steps_per_s"].items())
    console.print(f"median steps/s: {med}")
    for name, ratio in summary["ratios"].items():
        console.print(f"ratio {name} = {ratio:.2f} (per CPU-second {summary['ratios_per_cpu_s'][name]:.2f})")


def mean_prompt_len(args: argparse.Namespace) -> float:
    """Mean policy-prompt length of the benchmark's problems (what each side feeds the model)."""
    from transformers import AutoTokenizer

    from qed_lightning.data.records import render_policy_prompt

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    return statistics.fmean(len(render_policy_prompt(tokenizer, r["problem"])) for r in rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side:
        return run_side(args)
    with tempfile.TemporaryDirectory(prefix="bench_rl_") as tmp:
        if args.model is None:
            from qed_lightning.tools.tiny import build_tiny

            args.model = str(build_tiny(Path(tmp) / "model", preset="bench"))
        settings = {k: v for k, v in vars(args).items() if k not in ("side", "workdir", "json")}
        settings.update(dtype="float32", device="cpu", temperature=0.8,
                        top_p=1.0, optimizer="AdamW(weight_decay=0.01), constant LR", grad_clip=0.3,
                        entropy_coef=1e-4, kl="none (beta 0)", reward=f"scripted {RULE} / 7",
                        ours_reward="RubricJudge + ScriptedJudgeClient over local HTTP, fresh grade cache per run",
                        trl_reward="same ScoringRule in-process", trl_generation="transformers generate, one batch",
                        engines=ENGINES)
        print("settings: " + json.dumps(settings), flush=True)
        peak, flops = extra.peak_gemm_gflops(), extra.forward_flops_per_token(args.model)
        prompt_len = mean_prompt_len(args)
        settings.update(peak_gemm_gflops_per_core=peak, forward_flops_per_token=flops, mean_prompt_len=prompt_len)
        print(f"GEMM peak {peak:.1f} GFLOP/s per core; {flops / 1e6:.1f} MFLOP per token forward", flush=True)
        runs = []
        for rnd in range(1, args.rounds + 1):
            for side in args.sides if rnd % 2 else args.sides[::-1]:
                print(f"round {rnd}/{args.rounds}: {side} ...", flush=True)
                runs.append({**spawn(args, side, Path(tmp)), "round": rnd})
        peak_shares(runs, args, peak, flops, prompt_len)
        summary = summarize(runs)
        report(runs, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "runs": runs, **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
