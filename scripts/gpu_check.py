"""The offline GPU check: seven measurements of the training code on one GPU, written as one JSON (see
`qed_lightning.gpu_check` for what each measures and how).

    bash scripts/gpu_check.sh                       # on the GPU machine (installs the wheels in .whl/ first)
    python scripts/gpu_check.py --dry-run --out X   # the same code with tiny shapes on CPU (tested in the suite)
    bash scripts/gpu_check.sh --sections strategies --budget zero3=120   # rerun a cut part with more time

Time: every section has a budget (`Scale.budgets`, printed first; the strategies one per strategy) and runs in
processes of its own, killed when it is past its time: a section may use what the ones before it left, never the
budgets of the ones after it, so the whole run ends within the cap (480 s on the GPU) with every section reported:
ok, skipped (with the reason), cut (with its budget) or failed. The JSON is rewritten after every section and
strategy. Exit status: 0 when no section was cut or failed and every check in `checks` holds, 1 otherwise, 2
without a CUDA device (and no --dry-run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("gemm", "sft", "memory", "strategies", "logprob_gap", "flash_attn")
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


def save_model(shape: dict, out: Path) -> Path:
    """The random-weight model the strategy runs load (with a small tokenizer: its ids are never decoded), built on
    the CPU: this process keeps no GPU memory while the strategies' processes run."""
    from qed_lightning.gpu_check.measure import qwen3
    from qed_lightning.tools.tiny import _EMBEDDED_CORPUS, build_tokenizer

    qwen3(shape, "cpu").save_pretrained(out)
    build_tokenizer([_EMBEDDED_CORPUS], 300).save_pretrained(out)
    return out


def run_bounded(cmd: list[str], log: Path, seconds: float) -> tuple[str, float]:
    """Run `cmd` (output to `log`) for at most `seconds`: ("ok" | "cut" | "exit N", seconds used). A cut process is
    killed with its whole process group (DeepSpeed's and Lightning's helpers too), which frees its GPU memory."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=max(seconds, 0.1))
        except subprocess.TimeoutExpired:
            code = None
        finally:  # past its time, or this script interrupted (the outer `timeout`): nothing left behind
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    used = time.perf_counter() - started
    return ("cut" if code is None else "ok" if code == 0 else f"exit {code}"), used


def outcome(status: str, log: Path, budget: float, allowed: float, used: float) -> dict:
    """What a section or strategy reports of its run besides its numbers."""
    out = {"status": status if status in ("ok", "cut") else "failed", "budget_s": budget,
           "allowed_s": round(allowed, 1), "used_s": round(used, 1)}
    if status != "ok":
        out["log_tail"] = log.read_text(errors="replace")[-2000:]
        if status != "cut":
            out["error"] = status
    return out


def strategies(scale, out: Path, deadline: float, results: dict, save) -> None:
    """Measurements 4-5 into `results`: one subprocess per strategy (`qed_lightning.gpu_check.rl_step`), each within
    its budget plus what the ones before it left, `save()` after each, then the strategies' updates compared with
    the no-strategy one."""
    import torch

    model = save_model(scale.rl_shape, out / "rl_model")
    budgets = scale.strategy_budgets
    for i, name in enumerate(STRATEGIES):
        part = out / f"rl_{name}.json"
        for stale in (part, part.with_suffix(".sketch.pt")):  # a rerun in the same folder compares fresh numbers
            stale.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "qed_lightning.gpu_check.rl_step", "--strategy", name, "--model", str(model),
               "--device", scale.device, "--out", str(part), "--prompt-tokens", str(scale.prompt_tokens),
               "--lengths", *map(str, scale.rl_completions), "--chunk", str(scale.chunk)]
        allowed = max(deadline - sum(budgets[n] for n in STRATEGIES[i + 1:]) - time.perf_counter(), 0.0)
        log = out / f"rl_{name}.log"
        status, used = run_bounded(cmd, log, allowed)
        report = outcome(status, log, budgets[name], allowed, used)
        results[name] = {**json.loads(part.read_text()), **report} if status == "ok" else report
        print(f"gpu_check:   strategy {name}: {describe(results[name])}", flush=True)
        save()
    reference = out / "rl_none.sketch.pt"
    for name, result in results.items():
        sketch = out / f"rl_{name}.sketch.pt"
        if "rl" in result and sketch.exists() and reference.exists():
            a, b = torch.load(sketch), torch.load(reference)
            result["rl"]["update_rel_diff_vs_none"] = float((a - b).norm() / b.norm().clamp(min=1e-30))


def describe(report: dict) -> str:
    """One line of a section's or strategy's time: used against its budget (and what it was allowed)."""
    times = f"{report['used_s']} s of its {report['budget_s']} s budget ({report['allowed_s']} s allowed)"
    if report["status"] == "cut":
        return (f"CUT at {report['used_s']} s (budget {report['budget_s']} s, {report['allowed_s']} s allowed; "
                "see its log)")
    if report["status"] == "skipped":
        return f"skipped ({report['reason']}) in {times}"
    if report["status"] == "ok":
        return f"ok in {times}"
    return f"FAILED ({report['error'].strip().splitlines()[-1]}) in {times}"


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
        if r.get("status") != "ok":
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


def run_section(name: str, scale, out: Path, results: dict, deadline: float, save) -> dict:
    """Section `name` into `results[name]`, in subprocesses that end by `deadline` (`time.perf_counter()`); returns
    its outcome (status, budget, time allowed and used)."""
    from qed_lightning.gpu_check import measure

    budget, allowed = scale.budgets[name], max(deadline - time.perf_counter(), 0.0)
    started = time.perf_counter()
    if name == "strategies":
        results["strategies"] = {}
        strategies(scale, out, deadline, results["strategies"], save)
        bad = [f"{n} {r['status']}" for n, r in results["strategies"].items() if r["status"] != "ok"]
        return {"status": "failed" if bad else "ok", "budget_s": budget, "allowed_s": round(allowed, 1),
                "used_s": round(time.perf_counter() - started, 1),
                **({"error": "not ok: " + ", ".join(bad)} if bad else {})}
    if name == "flash_attn" and (reason := measure.flash_unavailable(scale.device)):
        results[name] = {"skipped": reason}
        return {"status": "skipped", "reason": reason, "budget_s": budget, "allowed_s": round(allowed, 1),
                "used_s": round(time.perf_counter() - started, 1)}
    part, log = out / f"{name}.json", out / f"{name}.log"
    part.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "qed_lightning.gpu_check.measure", name, "--device", scale.device,
           "--out", str(part)]
    if name == "sft" and results.get("gemm", {}).get("tflops"):
        cmd += ["--gemm-tflops", str(results["gemm"]["tflops"])]
    status, used = run_bounded(cmd, log, allowed)
    if status == "ok":
        results[name] = json.loads(part.read_text())
    return outcome(status, log, budget, allowed, used)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_check/results.json", help="the JSON of results")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: checks the code, measures nothing")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--budget", nargs="+", default=[], metavar="NAME=SECONDS",
                        help="another time budget for a section or a strategy (e.g. zero3=90 to rerun one cut)")
    args = parser.parse_args(argv)
    started = time.perf_counter()  # the cap counts from here (torch's import included)
    import torch

    from qed_lightning.gpu_check.measure import CPU, GPU

    scale = CPU if args.dry_run else GPU
    if scale.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run for the CPU version of the check)", file=sys.stderr)
        return 2
    try:
        scale = with_budgets(scale, args.budget)
    except ValueError as error:
        parser.error(str(error))
    plan = {name: scale.budgets[name] for name in args.sections}
    if sum(plan.values()) > scale.cap:
        parser.error(f"the sections' budgets add up to {sum(plan.values())} s, past the {scale.cap:.0f} s cap")
    print(f"gpu_check: time budget {sum(plan.values())} s of the {scale.cap:.0f} s cap: "
          + ", ".join(f"{name} {seconds} s" for name, seconds in plan.items()), flush=True)
    if "strategies" in plan:
        print("gpu_check:   strategies: model saving, then " + ", ".join(
            f"{name} {scale.strategy_budgets[name]} s" for name in STRATEGIES), flush=True)
    path = Path(args.out).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"environment": environment(scale.device), "dry_run": args.dry_run, "cap_s": scale.cap,
                     "sections": {}}

    def save() -> None:
        results["checks"] = checks(results)
        path.write_text(json.dumps(results, indent=1))

    names, sections_start = list(plan), time.perf_counter()
    results["setup_s"] = round(sections_start - started, 1)
    print(f"gpu_check: set up in {results['setup_s']} s of the cap's spare {scale.cap - sum(plan.values()):.0f} s",
          flush=True)
    for i, name in enumerate(names):
        # a section may use what the ones before it left, never the budgets of the ones after it
        deadline = sections_start + sum(plan[n] for n in names[: i + 1])
        section_start = time.perf_counter()
        try:
            report = run_section(name, scale, path.parent, results, deadline, save)
        except Exception:  # one section failing must not lose the others' numbers
            report = {"status": "failed", "budget_s": plan[name],
                      "allowed_s": round(max(deadline - section_start, 0), 1),
                      "used_s": round(time.perf_counter() - section_start, 1), "error": traceback.format_exc()[-3000:]}
        results["sections"][name] = report
        save()
        print(f"gpu_check: {name}: {describe(report)}", flush=True)
    failed = [n for n, r in results["sections"].items() if r["status"] not in ("ok", "skipped")]
    ok = not failed and all(results["checks"].values())
    print(f"gpu_check: {'ok' if ok else 'FAILED'} in {time.perf_counter() - started:.0f} s of the "
          f"{scale.cap:.0f} s cap{'; not ok: ' + ', '.join(failed) if failed else ''}; results in {path}", flush=True)
    return 0 if ok else 1


def with_budgets(scale, overrides: list[str]):
    """`scale` with the `NAME=SECONDS` budgets of `--budget` (a strategy's changes its section's by the same)."""
    import dataclasses

    budgets, strategy_budgets = dict(scale.budgets), dict(scale.strategy_budgets)
    for item in overrides:
        name, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"--budget {item}: expected NAME=SECONDS") from None
        if name in strategy_budgets:
            budgets["strategies"] += seconds - strategy_budgets[name]
            strategy_budgets[name] = seconds
        elif name in budgets:
            budgets[name] = seconds
        else:
            raise ValueError(f"--budget {item}: no section or strategy {name!r} (one of "
                             f"{', '.join([*budgets, *strategy_budgets])})")
    return dataclasses.replace(scale, budgets=budgets, strategy_budgets=strategy_budgets)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    sys.exit(main())
