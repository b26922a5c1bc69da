"""GPU check of the scale-out presets: SFT and RL steps of a ~0.3B random Qwen3 in bf16 under DeepSpeed ZeRO-3 and
FSDP2 on one GPU, through the real `qed-fit` entry point; prints tokens/s, peak memory and losses per run.

    bash scripts/gpu_check.sh            # sets up .venv-gpu if needed, then runs this (< 8 min on one H100)
    python scripts/gpu_check.py --out runs/gpu_check --only fsdp2

The model: Qwen3 with hidden 1024, 24 layers, 16 heads, 8 KV heads, head_dim 64, intermediate 3072, and the tiny
offline tokenizer (a few hundred tokens, so the embeddings are negligible): 302M parameters, built in code, nothing
downloaded. RL uses the HF engine (it shares the policy: vLLM is not installed here) and the scripted judge.
Exit status: 0 when every run trained (finite, logged losses), 1 otherwise, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("deepspeed_zero3", "fsdp2")
SHAPE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
             intermediate_size=3072)


def require_cuda() -> None:
    try:
        import torch
    except ImportError:
        sys.exit("gpu_check: torch is not installed; run scripts/gpu_check.sh, which sets up the environment")
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False). This check needs one NVIDIA GPU; "
              "the CPU tests cover DDP and FSDP2 (tests/integration/test_distributed.py).", file=sys.stderr)
        sys.exit(2)


def build_model(out: Path) -> tuple[Path, int]:
    """The ~0.3B random Qwen3 with the tiny tokenizer, written to `out` (deterministic: seed 0)."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from qed_lightning.tiny import _EMBEDDED_CORPUS, _corpus_from_files, _repo_samples, build_tokenizer

    tokenizer = build_tokenizer(_corpus_from_files(_repo_samples()) + [_EMBEDDED_CORPUS], 512)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=16384, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, dtype="bfloat16", **SHAPE)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=tokenizer.pad_token_id, do_sample=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def qed_fit_args(stage: str, strategy: str, model: Path, root: Path, steps: int) -> list[str]:
    common = ["--config", str(REPO / f"configs/demo/{stage}.yaml"), "--config", str(REPO / f"configs/strategy/{strategy}.yaml"),
              "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-true",
              "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(root), "--trainer.callbacks", "[]",
              "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.callbacks+=lightning.pytorch.callbacks.DeviceStatsMonitor",
              "--model.init_args.model_name_or_path", str(model), "--model.init_args.dtype", "bfloat16",
              "--model.init_args.gradient_checkpointing", "true", "--model.init_args.export_hf", "false"]
    if stage == "sft":
        return common + ["--data.init_args.path", str(REPO / "data/samples/fineproofs_sft.jsonl"), "--data.init_args.max_length", "4096",
                         "--data.init_args.batch_size", "4"]
    return common + ["--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"), "--data.init_args.val_size", "0",
                     "--data.init_args.prompts_per_step", "8", "--model.init_args.group_size", "8",
                     "--model.init_args.max_new_tokens", "256", "--model.init_args.optimizer.init_args.lr", "1e-5",
                     "--model.init_args.engine", '{"class_path": "qed_lightning.rollout.HFEngine", "init_args": {"batch_size": 64}}',
                     "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite")]


def summarize(root: Path) -> dict[str, float]:
    (run_dir,) = sorted((root / "csv").glob("version_*"))
    with open(run_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    series = lambda key: [float(r[key]) for r in rows if r.get(key)]  # noqa: E731
    peak_cols = [k for k in rows[0] if k.endswith("allocated_bytes.all.peak")] if rows else []
    peak = max((float(r[c]) for r in rows for c in peak_cols if r.get(c)), default=float("nan"))
    losses, tps = series("train/loss"), series("train/tokens_per_sec")
    steady = tps[1:] or tps  # the first step includes warm-up
    norms = series("train/grad_norm")  # RL: under ZeRO it must come from DeepSpeed (p.grad is None there)
    return {"steps": len(losses), "grad_norm_max": max(norms, default=float("nan")),
            "loss_first": losses[0] if losses else float("nan"),
            "loss_last": losses[-1] if losses else float("nan"),
            "tokens_per_sec": sum(steady) / len(steady) if steady else float("nan"), "peak_mem_gib": peak / 2**30}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--only", choices=STRATEGIES, default=None)
    parser.add_argument("--sft-steps", type=int, default=12)
    parser.add_argument("--rl-steps", type=int, default=4)
    args = parser.parse_args(argv)
    require_cuda()
    import torch

    out = Path(args.out).resolve()
    model, n_params = build_model(out / "model")
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, model {n_params / 1e6:.0f}M parameters", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results, ok = [], True
    for strategy in [args.only] if args.only else STRATEGIES:
        for stage, steps in (("sft", args.sft_steps), ("rl", args.rl_steps)):
            root = out / f"{strategy}-{stage}"
            started = time.perf_counter()
            log = out / f"{strategy}-{stage}.log"
            with open(log, "w") as fh:
                proc = subprocess.run([sys.executable, "-m", "qed_lightning.cli", *qed_fit_args(stage, strategy, model, root, steps)],
                                      stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=900)
            row = {"strategy": strategy, "stage": stage, "rc": proc.returncode, "wall_s": round(time.perf_counter() - started, 1)}
            if proc.returncode == 0:
                row.update(summarize(root))
            else:
                row["log_tail"] = log.read_text(errors="replace")[-1500:]
            trained = proc.returncode == 0 and row.get("steps") == steps and row["loss_last"] == row["loss_last"]
            if stage == "rl":  # a zero norm means the clip read empty p.grad (ZeRO) instead of DeepSpeed's norm
                trained = trained and row.get("grad_norm_max", 0.0) > 0
            ok &= trained
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"{'strategy':<16} {'stage':<4} {'tok/s':>9} {'peak GiB':>9} {'loss first':>11} {'loss last':>10} {'wall s':>7}")
    for r in results:
        print(f"{r['strategy']:<16} {r['stage']:<4} {r.get('tokens_per_sec', float('nan')):>9.0f} {r.get('peak_mem_gib', float('nan')):>9.2f} "
              f"{r.get('loss_first', float('nan')):>11.4f} {r.get('loss_last', float('nan')):>10.4f} {r['wall_s']:>7}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
