#!/usr/bin/env python3
"""SFT loss memory: `SFTModule`'s chunked LM-head loss against its full-logits path, at a real vocabulary size.

What is measured: one SFT forward + backward on one packed row of `--length` labelled tokens, in its own process,
for each `loss_chunk_tokens` setting: 0 (the baseline: every position's `[L, V]` logits at once, then float32
cross-entropy) and the chunked settings (labelled positions only, `chunk` at a time under activation
checkpointing). Reported: peak RSS of the process, the peak above the loaded model (RSS before the step), the step
time, the loss (it must agree across settings) and the baseline/setting ratio of the extra peak.

The model is a Qwen3 with the Qwen3 vocabulary (151,936) and a small body (hidden 256, 2 layers, float32, CPU), so
the LM head and its logits dominate the way they do at paper scale (a 32k-token row and the same vocabulary on a
4B model; see `qed_lightning.modules.sft`). Nothing is downloaded; the tiny tokenizer is copied next to the model.

Usage: .venv/bin/python scripts/bench_sft_memory.py [--length 4096] [--chunks 0 4096 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = "MEM_RESULT "


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=4096, help="labelled tokens in the row")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 4096, 1024], help="loss_chunk_tokens; 0 = baseline")
    p.add_argument("--side", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def run_side(args: argparse.Namespace) -> None:
    import torch

    from qed_lightning.modules import SFTModule

    torch.manual_seed(0)
    module = SFTModule(args.model, loss_chunk_tokens=args.side, export_hf=False)
    module.configure_model()
    ids = torch.randint(0, args.vocab, (1, args.length))
    batch = {"input_ids": ids, "position_ids": torch.arange(args.length)[None], "labels": ids.clone()}
    before = current_rss_mib()
    start = time.perf_counter()
    loss, n = module.compute_loss(batch)
    loss.backward()
    seconds = time.perf_counter() - start
    print(MARKER + json.dumps({"chunk": args.side, "peak_rss_mib": rss_mib(), "model_rss_mib": before,
                               "extra_peak_mib": rss_mib() - before, "seconds": seconds, "loss": float(loss),
                               "tokens": int(n)}), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.side is not None:
        return run_side(args)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qed_lightning.tools.tiny import build_tiny

    with tempfile.TemporaryDirectory(prefix="bench_sft_mem_") as tmp:
        tiny = build_tiny(Path(tmp) / "tiny", preset="test")
        config = Qwen3Config(vocab_size=args.vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                             max_position_embeddings=max(8192, args.length))
        model_dir = Path(tmp) / "model"
        Qwen3ForCausalLM(config).save_pretrained(model_dir)
        for f in Path(tiny).iterdir():
            if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy(f, model_dir / f.name)
        print(json.dumps({"length": args.length, "vocab": args.vocab, "hidden": 256, "layers": 2, "dtype": "float32",
                          "device": "cpu"}), flush=True)
        results = []
        for chunk in args.chunks:
            proc = subprocess.run([sys.executable, __file__, "--side", str(chunk), "--model", str(model_dir),
                                   "--length", str(args.length), "--vocab", str(args.vocab)],
                                  capture_output=True, text=True)
            found = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
            if proc.returncode != 0 or not found:
                sys.exit(f"loss_chunk_tokens={chunk} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            results.append(json.loads(found[-1][len(MARKER):]))
    base = next((r for r in results if r["chunk"] == 0), results[0])
    print(f"{'loss_chunk_tokens':>18} {'peak RSS MiB':>13} {'extra peak MiB':>15} {'step s':>7} {'loss':>9} "
          f"{'extra-peak ratio vs 0':>22}")
    for r in results:
        ratio = base["extra_peak_mib"] / max(r["extra_peak_mib"], 1e-9)
        print(f"{r['chunk']:>18} {r['peak_rss_mib']:>13.0f} {r['extra_peak_mib']:>15.0f} {r['seconds']:>7.2f} "
              f"{r['loss']:>9.4f} {ratio:>21.2f}x")


if __name__ == "__main__":
    main()
