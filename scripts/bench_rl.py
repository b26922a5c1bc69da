#!/usr/bin/env python3
"""RL throughput: our `RubricRLModule` (through `qed-fit`) against TRL's `GRPOTrainer`, on one CPU.

What is measured: RL steps per second, where one step = generate `prompts x G` rollouts, grade them, and take one
optimizer step on them (plus, on our side, pushing the new weights into the rollout engine). The clock runs from
the end of the warm-up step(s) to the end of the last step, so it holds everything each trainer does per step:
sampling, reward, forward/backward, optimizer, weight sync, logging. Also shown: rollouts/s, generated tokens/s,
the time per step of each phase (ours: the module's `time/*` and `rollout/sync_time_s` metrics; TRL: its
`_generate_single_turn` and `_calculate_rewards` timed by wrapping them), and peak RSS of each side's process.

Sides (each run in its own subprocess; per round the order is reversed every other round, A B C / C B A):
- ours-vllm: `qed_lightning.cli.make_cli` on configs/demo/rl.yaml with `VLLMEngine` (vLLM CPU, in-process);
- ours-hf: the same with `HFEngine` (transformers `generate` on the shared policy module);
- trl: `GRPOTrainer` (transformers `generate`, TRL's default without vLLM).
Same on all sides: the model folder (float32, CPU), the chat-templated policy prompt of each problem of
data/samples/fineproofs_rl.jsonl (TRL gets them as a conversational `prompt` column; its tokenization was checked
to give the same ids as `render_policy_prompt`), G, prompts per step, max new tokens, temperature 0.8, top_p 1,
AdamW (lr, weight decay 0.01, constant LR), grad-norm clip 0.3, entropy bonus 1e-4, no KL (no reference model),
one optimizer step per generation batch (TRL: per_device_train_batch_size = prompts x G, gradient accumulation 1,
steps_per_generation 1, num_iterations 1), no eval, no checkpoints, local logging only.

Fairness caveats:
- Reward: ours goes through the real judge path (`RubricJudge` renders the rubric prompt, `ScriptedJudgeClient`
  posts it over local HTTP to the scripted server, the reply is parsed, grades go to a fresh SQLite cache per run);
  TRL calls the same `ScoringRule` in-process on the same proof text. That favours TRL (no HTTP, no cache).
- Training pass: ours uses `--layout` (default "auto" = on CPU "shared_prefix": each prompt runs through the model
  once per micro-batch of `--micro-batch-tokens` tokens and its G completions attend to its cached keys/values, the
  same gradient as G full rows; "padded" = one right-padded `prompt + completion` row per rollout); TRL pads the
  prompts x G sequences into one `[B, T]` batch (prompts left-padded to the longest) and recomputes each prompt G
  times. This is the one place where the two sides do different work for the same result.
- Ours-HF generates each prompt's G samples in a separate seeded `generate` call (reproducible sampling);
  TRL generates the whole batch in one call. vLLM needs start-up time (outside the clock) and a weight reload per
  step (inside it). The loss aggregation differs (ours: paper's token sum / sequences; TRL: dr_grpo), same cost.
- Threads: every side gets `--threads` torch/OpenMP threads (vLLM with VLLM_CPU_OMP_THREADS_BIND=nobind, so it
  keeps them instead of binding one thread per core). On a machine busy with other jobs, OpenMP threads spin-wait
  on descheduled siblings: measured here at load ~6 on 2 cores, one `generate` call took 22 s with 2 threads and
  2.2 s with 1. Hence the default `--threads 1`; on an idle machine `--threads 2` is ~1.5x faster on every side.
  The 1-minute load average at the end of each run is shown.

How to read: "ratio" = median(ours steps/s) / median(TRL steps/s) for each of our engines; > 1 = ours faster.
The issue's target is ours-vllm / trl >= 2. The phase columns say where a step goes (TRL's training pass is
s/step - gen s - grade s). `--micro-batch-tokens` defaults to configs/demo/rl.yaml's 4096. With `--layout padded`
the training pass is the same work on both sides and bounds the ratio whatever the engine. The default run (3 sides x 2 rounds, one
thread) takes ~13 minutes on 2 cores; `--rounds 1 --sides ours-vllm trl` takes ~3.

Usage: .venv/bin/python scripts/bench_rl.py [--rounds 2] [--steps 6] [--group-size 8] [--json OUT]
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
MARKER = "BENCH_RESULT "
SIDES = ("ours-vllm", "ours-hf", "trl")
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
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write settings and results to this file")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side, print JSON
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- measurement -------------------------------------------------------------------------------------------------


def finish(side: str, args: argparse.Namespace, ticks: list[float], phases: dict[str, list[float]],
           gen_tokens: list[int]) -> dict:
    """ticks[i] = end of step i (ticks[0] = start of training); phases/gen_tokens: one entry per step."""
    import torch

    w, n = args.warmup, args.steps
    if len(ticks) != w + n + 1:
        raise RuntimeError(f"{side}: recorded {len(ticks) - 1} steps, expected {w + n}")
    seconds = ticks[w + n] - ticks[w]
    rollouts = args.prompts_per_step * args.group_size * n
    result = {"side": side, "steps_per_s": n / seconds, "rollouts_per_s": rollouts / seconds, "seconds": seconds,
              "gen_tokens_per_s": sum(gen_tokens[w:w + n]) / seconds,
              "mean_completion_len": sum(gen_tokens[w:w + n]) / rollouts,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load_1m": os.getloadavg()[0],
              "threads": torch.get_num_threads()}
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
        """Ticks at each step's start (= after the previous step's weight sync) and once when training ends."""

        ticks: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            StepTimer.ticks.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            StepTimer.ticks.append(time.perf_counter())

    return StepTimer


StepTimer = None  # defined in the --side subprocess (lightning is not imported by the driver)


def ours_cli_args(args: argparse.Namespace, root: Path) -> list[str]:
    overrides = {
        "seed_everything": args.seed, "trainer.default_root_dir": root, "trainer.max_steps": args.warmup + args.steps,
        "trainer.enable_checkpointing": "false", "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
        "trainer.callbacks": json.dumps([{"class_path": "__main__.StepTimer"}]),  # drops progress bar + checkpoints
        "model.init_args.model_name_or_path": args.model, "model.init_args.export_hf": "false",
        "model.init_args.engine": json.dumps(ENGINES[args.side]), "model.init_args.group_size": args.group_size,
        "model.init_args.max_new_tokens": args.max_new_tokens, "model.init_args.temperature": 0.8,
        "model.init_args.top_p": 1.0, "model.init_args.micro_batch_tokens": args.micro_batch_tokens, "model.init_args.micro_batch_layout": args.layout,
        "model.init_args.optimizer.init_args.lr": args.lr,
        "model.init_args.judge.init_args.cache_path": root / "grades.sqlite",  # fresh per run: no cache hits
        "data.init_args.path": args.data, "data.init_args.prompts_per_step": args.prompts_per_step,
        "data.init_args.val_size": 0,
    }
    return ["--config", str(ROOT / "configs/demo/rl.yaml"), *(f"--{k}={v}" for k, v in overrides.items())]


def run_ours(args: argparse.Namespace) -> dict:
    global StepTimer
    from qed_lightning.cli import make_cli

    StepTimer = _step_timer_class()
    root = Path(tempfile.mkdtemp(prefix=f"bench_rl_{args.side}_", dir=args.workdir))
    make_cli(args=ours_cli_args(args, root))
    ticks = StepTimer.ticks  # [start of step 0, start of step 1 (= end of step 0, after its sync), ..., end]
    phases = {k: csv_series(root, f"time/{k}_s") for k in ("generate", "grade", "train")}
    phases["sync"] = csv_series(root, "rollout/sync_time_s")
    group = args.prompts_per_step * args.group_size
    gen_tokens = [round(x * group) for x in csv_series(root, "rollout/response_len_mean")]
    return finish(args.side, args, ticks, phases, gen_tokens)


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

    ticks: list[float] = []
    phases: dict[str, list[float]] = {"generate": [], "grade": []}
    gen_tokens: list[int] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **kw) -> None:
            ticks.append(time.perf_counter())

        def on_step_end(self, *a, **kw) -> None:
            ticks.append(time.perf_counter())

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
             args.micro_batch_tokens, "--layout", args.layout, "--lr", args.lr, "--steps", args.steps, "--warmup", args.warmup,
             "--threads", args.threads, "--seed", args.seed, "--side", side, "--workdir", workdir]
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
    sides = list(dict.fromkeys(r["side"] for r in runs))
    median = {s: statistics.median(r["steps_per_s"] for r in runs if r["side"] == s) for s in sides}
    ratios = {f"{s}/trl": median[s] / median["trl"] for s in sides if s != "trl" and "trl" in median}
    return {"median_steps_per_s": median, "ratios": ratios}


def report(runs: list[dict], summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ["side", "round", "steps/s", "rollouts/s", "gen tok/s", "s/step", "gen s", "grade s", "train s",
            "sync s", "mean len", "peak RSS MiB", "threads", "process s", "load 1m"]
    table = Table(title="RL throughput (timed steps only; phase columns are seconds per step)")
    for c in cols:
        table.add_column(c, justify="left" if c == "side" else "right")
    for r in runs:
        phase = lambda k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
        table.add_row(r["side"], str(r["round"]), f"{r['steps_per_s']:.3f}", f"{r['rollouts_per_s']:.1f}",
                      f"{r['gen_tokens_per_s']:.0f}", f"{1 / r['steps_per_s']:.2f}", phase("generate_s_per_step"),
                      phase("grade_s_per_step"), phase("train_s_per_step"), phase("sync_s_per_step"),
                      f"{r['mean_completion_len']:.1f}", f"{r['peak_rss_mib']:.0f}", str(r["threads"]),
                      f"{r['process_s']:.0f}",
                      f"{r['load_1m']:.1f}")
    console = Console(width=160)
    console.print(table)
    med = ", ".join(f"{s} {v:.3f}" for s, v in summary["median_steps_per_s"].items())
    console.print(f"median steps/s: {med}")
    for name, ratio in summary["ratios"].items():
        target = " (target >= 2: " + ("met" if ratio >= 2 else "NOT met") + ")" if name.startswith("ours-vllm") else ""
        console.print(f"ratio {name} = {ratio:.2f}{target}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side:
        return run_side(args)
    with tempfile.TemporaryDirectory(prefix="bench_rl_") as tmp:
        if args.model is None:
            from qed_lightning.tiny import build_tiny

            args.model = str(build_tiny(Path(tmp) / "model", preset="bench"))
        settings = {k: v for k, v in vars(args).items() if k not in ("side", "workdir", "json")}
        settings.update(dtype="float32", device="cpu", temperature=0.8,
                        top_p=1.0, optimizer="AdamW(weight_decay=0.01), constant LR", grad_clip=0.3,
                        entropy_coef=1e-4, kl="none (beta 0)", reward=f"scripted {RULE} / 7",
                        ours_reward="RubricJudge + ScriptedJudgeClient over local HTTP, fresh grade cache per run",
                        trl_reward="same ScoringRule in-process", trl_generation="transformers generate, one batch",
                        engines=ENGINES)
        print("settings: " + json.dumps(settings), flush=True)
        runs = []
        for rnd in range(1, args.rounds + 1):
            for side in args.sides if rnd % 2 else args.sides[::-1]:
                print(f"round {rnd}/{args.rounds}: {side} ...", flush=True)
                runs.append({**spawn(args, side, Path(tmp)), "round": rnd})
        summary = summarize(runs)
        report(runs, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "runs": runs, **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
