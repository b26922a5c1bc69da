#!/usr/bin/env python3
"""SFT throughput: our `SFTModule` + `SFTDataModule` (Lightning) against TRL's `SFTTrainer` with packing.

Measured: trained tokens per second, i.e. tokens whose label is not -100 (prompt and padding excluded), summed
over the timed optimizer steps and divided by the wall time from the end of the last warm-up step to the end of
the last step, so it includes all per-step work (data loading, collation, forward, backward, optimizer, logging).
Both sides load the same tiny Qwen3 folder (float32, CPU, default sdpa attention) and get the same examples,
token budget per packed row (`--max-length`), rows per micro-batch, steps, `torch.optim.AdamW(lr=1e-4)` on all
parameters, torch threads; no LR schedule, gradient clipping, gradient checkpointing, eval or checkpoints.

Differences inherent to each trainer:
- Ours: first-fit-decreasing packing, rows padded to the longest row of the micro-batch (`[B, L]`), loss on the
  assistant span (thinking ... `<|im_end|>`), full logits then cross-entropy.
- TRL 1.16: `assistant_only_loss` needs `{% generation %}` markers or one of TRL's known templates; ours is
  neither, so TRL gets `completion_only_loss=True` on prompt/completion rows split from the same messages (prompt
  = turns before the last assistant turn). That also trains the newline after `<|im_end|>`: one more labelled
  token per example (column "labelled/pass"). Packing "bfd" (best-fit decreasing) forces padding-free batches:
  the micro-batch's rows are flattened into one `[1, sum]` row with restarting position ids, which on CPU (sdpa,
  no varlen kernel) attends through a dense block-diagonal mask over the whole flattened length. The loss uses
  TRL's chunked fused LM head (no full logits), which also computes entropy and token accuracy every step.

How to read: "ratio" = median(ours tokens/s) / median(TRL tokens/s); > 1 means ours trains faster. The sides
alternate (ours, trl, ours, trl, ...), each in its own subprocess so that peak RSS (`ru_maxrss`) is per side.
"cpu s" is the process CPU time over the same window: when other jobs share the machine ("load 1m" above the
thread count) wall time inflates, and tokens per CPU-second is the steadier comparison (steadiest at --threads 1).

Usage: .venv/bin/python scripts/bench_sft.py [--rounds 2] [--steps 10] [--threads N] [--json OUT]
"""

from __future__ import annotations

import argparse
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
LR = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: build the 'bench' tiny preset into a temp dir)")
    p.add_argument("--data", default=str(ROOT / "data/samples/fineproofs_sft.jsonl"), help="JSONL with `messages`")
    p.add_argument("--repeat", type=int, default=4, help="repeat the data file this many times")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per packed row (both sides)")
    p.add_argument("--batch-size", type=int, default=2, help="packed rows per micro-batch (both sides)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before the timed ones")
    p.add_argument("--rounds", type=int, default=2, help="alternating (ours, trl) rounds")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (both sides)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write settings and results to this file")
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # internal: run one side, print JSON
    return p.parse_args(argv)


# -- measurement (shared by both sides) --------------------------------------------------------------------------


class Meter:
    """Per-step end times and per-batch token counts, in training order."""

    def __init__(self) -> None:
        self.ticks: list[tuple[float, float]] = []  # (wall, process CPU) at train start, then after each step
        self.batches: list[tuple[int, int, int]] = []  # (labelled, real, total) per micro-batch
        self.threads = 0

    def tick(self) -> None:
        self.ticks.append((time.perf_counter(), time.process_time()))

    def count(self, batch: dict, real: int | None = None) -> None:
        import torch

        labelled = int((batch["labels"] != -100).sum())
        total = batch["input_ids"].numel()
        self.batches.append((labelled, total if real is None else real, total))
        self.threads = torch.get_num_threads()

    def result(self, side: str, warmup: int, steps: int, labelled_per_pass: int, rows: int) -> dict:
        if len(self.ticks) != warmup + steps + 1 or len(self.batches) < warmup + steps:
            raise RuntimeError(f"{side}: ran {len(self.ticks) - 1} steps / {len(self.batches)} batches, expected "
                               f"{warmup + steps}; raise --repeat so the data lasts {warmup + steps} steps.")
        timed = self.batches[warmup : warmup + steps]
        (wall0, cpu0), (wall1, cpu1) = self.ticks[warmup], self.ticks[warmup + steps]
        labelled, real, total = (sum(col) for col in zip(*timed))
        return {
            "side": side, "tokens_per_s": labelled / (wall1 - wall0), "trained_tokens": labelled,
            "seconds": wall1 - wall0, "cpu_seconds": cpu1 - cpu0, "tokens_per_cpu_s": labelled / (cpu1 - cpu0),
            "padding_fraction": 1 - real / total, "tokens_per_step": total / steps,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": self.threads, "labelled_per_pass": labelled_per_pass, "packed_rows": rows,
            "load_1m": os.getloadavg()[0],
        }


# -- our side ----------------------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from qed_lightning.data.sft import SFTDataModule
    from qed_lightning.modules.sft import SFTModule

    meter = Meter()

    class StepTimer(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            meter.tick()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            meter.count(batch, real=int(batch["num_real_tokens"]))
            meter.tick()

    L.seed_everything(args.seed, verbose=False)
    module = SFTModule(model_name_or_path=args.model, export_hf=False,
                       optimizer=lambda p: torch.optim.AdamW(p, lr=LR))
    data = SFTDataModule(path=args.data, tokenizer=args.model, max_length=args.max_length,
                         batch_size=args.batch_size, truncation="truncate", seed=args.seed)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[StepTimer()])
    trainer.fit(module, datamodule=data)
    per_pass = sum(sum(x != -100 for x in r["labels"]) for r in data.train_rows)
    return meter.result("ours", args.warmup, args.steps, per_pass, len(data.train_rows))


# -- TRL side ----------------------------------------------------------------------------------------------------


def prompt_completion_rows(path: str) -> list[dict]:
    """Split each conversation at its last assistant turn: prompt = the turns before, completion = that turn."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in filter(str.strip, fh):
            messages = json.loads(line)["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            rows.append({"prompt": messages[:last], "completion": messages[last : last + 1]})
    return rows


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    meter = Meter()

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **kw) -> None:
            meter.tick()

        def on_step_end(self, *a, **kw) -> None:
            meter.tick()

    def counting(collate):  # TRL refuses a custom collator with padding-free packing, so wrap its own afterwards
        def wrapped(examples):
            batch = collate(examples)
            meter.count(batch, real=int(batch["attention_mask"].sum()) if "attention_mask" in batch else None)
            return batch
        return wrapped

    set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    out_dir = tempfile.TemporaryDirectory(prefix="bench_sft_trl_")  # nothing is saved; removed at exit
    config = SFTConfig(
        output_dir=out_dir.name, max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=0.0, max_length=args.max_length, packing=True,
        packing_strategy="bfd", completion_only_loss=True, gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=args.seed,
    )
    trainer = SFTTrainer(model=model, args=config, processing_class=AutoTokenizer.from_pretrained(args.model),
                         train_dataset=Dataset.from_list(prompt_completion_rows(args.data)),
                         optimizers=(torch.optim.AdamW(model.parameters(), lr=LR), None), callbacks=[StepTimer()])
    trainer.data_collator = counting(trainer.data_collator)
    trainer.train()
    per_pass = sum(sum(x != -100 for x in labels) for labels in trainer.train_dataset["labels"])
    return meter.result("trl", args.warmup, args.steps, per_pass, len(trainer.train_dataset))


# -- driver ------------------------------------------------------------------------------------------------------


def run_side(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = run_ours(args) if args.side == "ours" else run_trl(args)
    print(MARKER + json.dumps(result), flush=True)


def prepare_inputs(args: argparse.Namespace, workdir: Path) -> None:
    """Build the model (unless --model) and write the data file repeated --repeat times; sets args in place."""
    if args.model is None:
        from transformers.utils.logging import disable_progress_bar

        from qed_lightning.tools.tiny import build_tiny

        disable_progress_bar()
        args.model = str(build_tiny(workdir / "model", preset="bench"))
    lines = [line for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    repeated = workdir / "sft_repeated.jsonl"
    repeated.write_text("\n".join(lines * args.repeat) + "\n", encoding="utf-8")
    args.data = str(repeated)


def spawn(args: argparse.Namespace, side: str) -> dict:
    flags = ["--model", args.model, "--data", args.data, "--max-length", args.max_length, "--batch-size",
             args.batch_size, "--steps", args.steps, "--warmup", args.warmup, "--threads", args.threads,
             "--seed", args.seed, "--side", side]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, __file__, *map(str, flags)], capture_output=True, text=True, env=env)
    found = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        sys.exit(f"--side {side} failed (exit {proc.returncode}); last output:\n{tail}")
    return json.loads(found[-1][len(MARKER):])


def summarize(runs: list[dict]) -> dict:
    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["side"] == side)

    wall = {s: median(s, "tokens_per_s") for s in ("ours", "trl")}
    cpu = {s: median(s, "tokens_per_cpu_s") for s in ("ours", "trl")}
    return {"median_tokens_per_s": wall, "ratio_ours_over_trl": wall["ours"] / wall["trl"],
            "median_tokens_per_cpu_s": cpu, "cpu_ratio_ours_over_trl": cpu["ours"] / cpu["trl"]}


COLUMNS = {  # header: (result key, format)
    "side": ("side", "{}"), "round": ("round", "{}"), "tokens/s": ("tokens_per_s", "{:.0f}"),
    "trained tok": ("trained_tokens", "{}"), "wall s": ("seconds", "{:.1f}"), "cpu s": ("cpu_seconds", "{:.1f}"),
    "padding": ("padding_fraction", "{:.1%}"), "tok/step": ("tokens_per_step", "{:.0f}"),
    "peak RSS MiB": ("peak_rss_mib", "{:.0f}"), "threads": ("threads", "{}"),
    "labelled/pass": ("labelled_per_pass", "{}"), "rows": ("packed_rows", "{}"), "load 1m": ("load_1m", "{:.1f}"),
}


def report(runs: list[dict], summary: dict) -> None:
    cells = [[fmt.format(r[key]) for key, fmt in COLUMNS.values()] for r in runs]
    wall, cpu = summary["median_tokens_per_s"], summary["median_tokens_per_cpu_s"]
    footer = (f"median trained tokens/s: ours {wall['ours']:.0f}, trl {wall['trl']:.0f}; "
              f"ratio ours/trl = {summary['ratio_ours_over_trl']:.3f}\n"
              f"per CPU-second (less sensitive to other load): ours {cpu['ours']:.0f}, trl {cpu['trl']:.0f}; "
              f"ratio ours/trl = {summary['cpu_ratio_ours_over_trl']:.3f}")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for row in [list(COLUMNS), *cells]:
            print("  ".join(f"{c:>13}" for c in row))
        print(footer)
        return
    table = Table(title="SFT throughput (trained tokens/s)")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "side" else "right")
    for row in cells:
        table.add_row(*row)
    console = Console(width=160)
    console.print(table)
    console.print(footer, highlight=False)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side:
        return run_side(args)
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        prepare_inputs(args, Path(tmp))
        settings = {k: v for k, v in vars(args).items() if k not in ("side", "json")}
        settings.update(dtype="float32", device="cpu", optimizer=f"AdamW(lr={LR}, weight_decay=0.01)",
                        trl_packing="bfd (padding-free)", trl_loss="completion_only_loss (prompt/completion rows)",
                        ours_packing="first-fit-decreasing, padded [B, L]", ours_loss="assistant-only")
        print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
        runs = []
        for rnd in range(1, args.rounds + 1):
            for side in ("ours", "trl"):
                print(f"round {rnd}/{args.rounds}: {side} ...", flush=True)
                runs.append({**spawn(args, side), "round": rnd})
        summary = summarize(runs)
        report(runs, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "runs": runs, **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
