"""The offline GPU check: six measurements of the training code on one GPU, written as one JSON (see
`qed_lightning.gpu_check` for what each measures and how).

    bash scripts/gpu_check.sh                       # on the GPU machine (installs the wheels in .whl/ first)
    python scripts/gpu_check.py --dry-run --out X   # the same code with tiny shapes on CPU (tested in the suite)

The JSON is rewritten after every section, so a run cut short keeps what it measured. Exit status: 0 when every
section ran and every check in `checks` holds, 1 otherwise, 2 without a CUDA device (and no --dry-run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("gemm", "sft", "memory", "strategies", "logprob_gap")
STRATEGIES = ("none", "fsdp2", "zero2", "zero3", "pure_bf16")


def environment(device: str) -> dict:
    import lightning
    import torch
    import transformers

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "lightning": lightning.__version__, "device": device}
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError as error:
        env["deepspeed"] = f"not importable: {error}"
    return env


def save_model(shape: dict, out: Path, device: str) -> Path:
    """The random-weight model the strategy runs load (with a small tokenizer: its ids are never decoded)."""
    from qed_lightning.gpu_check.measure import qwen3
    from qed_lightning.tools.tiny import _EMBEDDED_CORPUS, build_tokenizer

    qwen3(shape, device).save_pretrained(out)
    build_tokenizer([_EMBEDDED_CORPUS], 300).save_pretrained(out)
    return out


def strategies(scale, out: Path, timeout: float, results: dict, save) -> None:
    """Measurements 4-5 into `results`: one subprocess per strategy (`qed_lightning.gpu_check.rl_step`), `save()`
    after each, then the strategies' updates compared with the no-strategy one."""
    import torch

    model = save_model(scale.rl_shape, out / "rl_model", scale.device)
    env = {**os.environ, "DS_ACCELERATOR": scale.device, "TOKENIZERS_PARALLELISM": "false"}
    for name in STRATEGIES:
        part = out / f"rl_{name}.json"
        cmd = [sys.executable, "-m", "qed_lightning.gpu_check.rl_step", "--strategy", name, "--model", str(model),
               "--device", scale.device, "--out", str(part), "--prompt-tokens", str(scale.prompt_tokens),
               "--lengths", *map(str, scale.rl_completions), "--chunk", str(scale.chunk)]
        with open(out / f"rl_{name}.log", "w") as log:
            try:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        results[name] = json.loads(part.read_text()) if code == 0 else {
            "error": code, "log_tail": (out / f"rl_{name}.log").read_text(errors="replace")[-2000:]}
        save()
    reference = out / "rl_none.sketch.pt"
    for name, result in results.items():
        sketch = out / f"rl_{name}.sketch.pt"
        if "rl" in result and sketch.exists() and reference.exists():
            a, b = torch.load(sketch), torch.load(reference)
            result["rl"]["update_rel_diff_vs_none"] = float((a - b).norm() / b.norm().clamp(min=1e-30))


def checks(results: dict) -> dict:
    """Pass/fail of what the numbers must show. bf16 compute makes 1 vs 4 micro-batches (other shapes, other
    rounding) differ slightly; a lost micro-batch (ZeRO-2 without the boundary fix) differs by tens of percent."""
    out = {}
    sft = {(r["row_tokens"], r["loss_chunk_tokens"]): r for r in results.get("sft", [])}
    for (row, chunk), r in sft.items():
        full = sft.get((row, 0))
        if chunk and full and r.get("peak_gib") is not None and full.get("peak_gib") is not None:
            out[f"sft_{row}_chunked_peak_below_full"] = r["peak_gib"] < full["peak_gib"]
    for name, r in results.get("strategies", {}).items():
        if "error" in r:
            out[f"{name}_ran"] = False
            continue
        changed = r["precision"]["changed_fraction"]
        out[f"{name}_precision"] = changed < 0.5 if name == "pure_bf16" else changed >= 0.99
        if "rl" in r:
            rl = r["rl"]
            out[f"{name}_rl_1_vs_4"] = (rl["micro_batches"][0] == 1 and rl["micro_batches"][1] > 1
                                        and rl["update_rel_diff_1_vs_4"] < 0.05
                                        and abs(rl["grad_norm"][1] / rl["grad_norm"][0] - 1) < 0.05)
            out[f"{name}_rl_vs_none"] = rl.get("update_rel_diff_vs_none", 1.0) < 0.05
    return out


def run_section(name: str, scale, out: Path, results: dict, timeout: float, save) -> None:
    from qed_lightning.gpu_check import measure

    if name == "gemm":
        results["gemm"] = measure.gemm(scale)
    elif name == "sft":
        results["sft"] = measure.sft(scale, results.get("gemm", {}).get("tflops") or measure.gemm(scale)["tflops"])
    elif name == "memory":
        results["memory"] = measure.memory(scale)
    elif name == "strategies":
        results["strategies"] = {}
        strategies(scale, out, timeout, results["strategies"], save)
    elif name == "logprob_gap":
        results["logprob_gap"] = measure.logprob_gap(scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_check/results.json", help="the JSON of results")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: checks the code, measures nothing")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--strategy-timeout", type=float, default=150.0, help="seconds per strategy subprocess")
    args = parser.parse_args(argv)
    import torch

    from qed_lightning.gpu_check.measure import CPU, GPU

    scale = CPU if args.dry_run else GPU
    if scale.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run for the CPU version of the check)", file=sys.stderr)
        return 2
    path = Path(args.out).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"environment": environment(scale.device), "dry_run": args.dry_run, "seconds": {}, "errors": {}}

    def save() -> None:
        results["checks"] = checks(results)
        path.write_text(json.dumps(results, indent=1))

    for name in args.sections:
        started = time.perf_counter()
        try:
            run_section(name, scale, path.parent, results, args.strategy_timeout, save)
        except Exception:  # one section failing must not lose the others' numbers
            results["errors"][name] = traceback.format_exc()[-3000:]
        results["seconds"][name] = round(time.perf_counter() - started, 1)
        save()
        print(f"gpu_check: {name} done in {results['seconds'][name]} s", flush=True)
    ok = not results["errors"] and all(results["checks"].values())
    print(f"gpu_check: {'ok' if ok else 'FAILED'}; results in {path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.exit(main())
