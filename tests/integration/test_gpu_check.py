"""The offline GPU check's CPU version (`bash scripts/gpu_check.sh --dry-run`): the very code the GPU run executes
(every section, every strategy subprocess: no strategy, FSDP2, DeepSpeed ZeRO-2/3 on DeepSpeed's CPU accelerator,
pure bf16) on tiny shapes, through its launcher, into one JSON whose checks all hold. Expected numbers at this scale
(measured): fp32 masters change > 99.9% of the weights at lr 1e-6, pure bf16 ~2%; 1 vs 4 micro-batches differ by
< 0.5% (bf16 compute rounding), the strategies from no strategy by ~1%."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_measures_every_section(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1100)
    results = json.loads(out.read_text())
    assert proc.returncode == 0, (proc.stdout[-2000:], results.get("errors"), results.get("checks"))
    assert results["dry_run"] and not results["errors"]
    assert set(results["seconds"]) == {"gemm", "sft", "memory", "strategies", "logprob_gap"}
    assert results["gemm"]["tflops"] > 0
    assert {(r["row_tokens"], r["loss_chunk_tokens"]) for r in results["sft"]} == {(256, 64), (256, 0), (512, 64), (512, 0)}
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
