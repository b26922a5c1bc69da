"""`scripts/cluster_check.sh` end to end in its CPU dry-run mode: the same script, 2 processes started by torchrun
(which Lightning joins), one vLLM CPU engine per rank, FSDP2, and the report's JSON with its checks. On a cluster the
same script runs on 2 GPUs in bf16 (README, "The paper's layout")."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from runs import REPO, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_cluster_check_dry_run_prints_one_json_whose_checks_pass(tmp_path):
    env = subprocess_env(CLUSTER_CHECK_CPU="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "scripts/cluster_check.sh"), str(tmp_path), "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ok"] and all(report["checks"].values()), report["checks"]
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert all(r["backend"] == "external_launcher" and r["handoff_counts"] == {"sleep": 2, "wake": 4}
               for r in report["ranks"])
    assert len(report["logprob_gap_max"]) == 2 and max(report["logprob_gap_max"]) < 1e-4  # float32 on CPU
    assert len(report["generate_tokens_per_s"]) == 2 and min(report["generate_tokens_per_s"]) > 0
