"""The offline GPU check's CPU version (`bash scripts/gpu_check.sh --dry-run`): the very code the GPU run executes
(every section, every strategy subprocess: no strategy, FSDP2, DeepSpeed ZeRO-2/3 on DeepSpeed's CPU accelerator,
pure bf16) on tiny shapes, through its launcher, into one JSON whose checks all hold; each section within its time
budget, the budgets printed first and within the cap, each section's time printed against its budget, the
flash-attention section skipped with its reason (no flash_attn, no CUDA). Expected numbers at this scale (measured):
fp32 masters change > 99.9% of the weights at lr 1e-6, pure bf16 ~2%; 1 vs 4 micro-batches differ by < 0.5% (bf16
compute rounding), the strategies from no strategy by ~1%. Measured: ~85 s in all (2 cores), of a 700 s cap.
And a section past its budget: cut, reported as cut with its budget, the sections after it still run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
SECTIONS = ["gemm", "sft", "memory", "strategies", "logprob_gap", "flash_attn"]
STRATEGIES = ["none", "fsdp2", "zero2", "zero3", "pure_bf16"]


def test_gpu_check_dry_run_measures_every_section(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=850)
    results = json.loads(out.read_text())
    assert proc.returncode == 0, (proc.stdout[-3000:], results.get("sections"), results.get("checks"))
    # the plan first: every section's budget, their sum within the cap
    plan = re.search(r"gpu_check: time budget (\S+) s of the (\S+) s cap: (.*)", proc.stdout)
    budgets = {name: float(seconds) for name, seconds in re.findall(r"(\w+) (\S+) s", plan[3])}
    assert list(budgets) == SECTIONS and sum(budgets.values()) == float(plan[1]) <= float(plan[2])
    strategy_plan = re.search(r"strategies: model saving, then (.*)", proc.stdout)[1]
    strategy_budgets = {name: float(seconds) for name, seconds in re.findall(r"(\w+) (\S+) s", strategy_plan)}
    assert list(strategy_budgets) == STRATEGIES and sum(strategy_budgets.values()) < budgets["strategies"]
    # then each section's time against its budget, and the whole within the cap
    sections = results["sections"]
    assert list(sections) == SECTIONS and results["dry_run"]
    for name, report in sections.items():
        assert report["budget_s"] == budgets[name] and report["used_s"] <= report["allowed_s"], (name, report)
        line = rf"gpu_check: {name}: (ok|skipped .*) in {report['used_s']} s of its .* budget"
        assert re.search(line, proc.stdout), (name, proc.stdout)
    for name in STRATEGIES:
        assert re.search(rf"strategy {name}: ok in \S+ s of its {strategy_budgets[name]:g} s budget", proc.stdout)
    assert sections["flash_attn"]["status"] == "skipped" and "flash" in sections["flash_attn"]["reason"]
    assert all(r["status"] == "ok" for n, r in sections.items() if n != "flash_attn"), sections
    assert results["setup_s"] + sum(r["used_s"] for r in sections.values()) <= float(plan[2])
    assert results["gemm"]["tflops"] > 0
    assert ({(r["row_tokens"], r["loss_chunk_tokens"]) for r in results["sft"]}
            == {(256, 64), (256, 0), (512, 64), (512, 0)})
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in results["sft"])
    assert results["memory"]["layers_target"] == 4 and results["memory"]["parameters_target"] > 0
    strategies = results["strategies"]
    assert set(strategies) == {"none", "fsdp2", "zero2", "zero3", "pure_bf16"}
    assert strategies["pure_bf16"]["precision"]["changed_fraction"] < 0.1
    for name in ("none", "fsdp2", "zero2", "zero3"):
        assert strategies[name]["precision"]["changed_fraction"] > 0.999, name
        assert strategies[name]["precision"]["master_dtype"] == "torch.float32", name
        assert strategies[name]["rl"]["micro_batches"] == [1.0, 4.0], name
    gap = results["logprob_gap"]
    assert 0 < gap["trainer_vs_bf16_hf_mean"] < 0.1 and gap["tokens"] > 0
    assert results["checks"] and all(results["checks"].values()), results["checks"]


def test_a_section_past_its_budget_is_cut_and_the_next_still_runs(tmp_path):
    out = tmp_path / "results.json"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--sections", "logprob_gap", "gemm",
                           "--budget", "logprob_gap=1", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}, timeout=300)
    assert proc.returncode == 1 and time.monotonic() - started < 120, proc.stdout[-2000:]
    assert "gpu_check: time budget 31.0 s of the 700 s cap: logprob_gap 1.0 s, gemm 30 s" in proc.stdout
    assert re.search(r"logprob_gap: CUT at 1\.\d s \(budget 1\.0 s, 1\.0 s allowed", proc.stdout), proc.stdout
    assert "gpu_check: FAILED" in proc.stdout and "not ok: logprob_gap;" in proc.stdout
    sections = json.loads(out.read_text())["sections"]
    assert sections["logprob_gap"]["status"] == "cut" and sections["logprob_gap"]["budget_s"] == 1.0
    assert "logprob_gap" not in json.loads(out.read_text())
    assert sections["gemm"]["status"] == "ok" and json.loads(out.read_text())["gemm"]["tflops"] > 0
