"""The paper pipeline as a user runs it: `scripts/rehearse.py` types the shipped paper configs (unmodified, then the
`configs/rehearsal/` overlays: sizes, devices, precision, the judge's client) in one working folder, so each stage
reads the previous stage's export through the config's own `model_name_or_path`:
sft -> rl -> validate --ckpt_path -> rc (summarizer: a real `vllm serve`) -> qed-eval. One chain per setting, checked
many ways: one process; two processes (FSDP2, the configs' strategy); stage 2 in each layout config.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from runs import REPO, read_metrics, series

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _rehearse(work: Path, tiny: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "scripts/rehearse.py"), "--work", str(work), "--tiny", str(tiny),
                           *args], capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def chain(tiny_model_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("rehearsal")
    out = _rehearse(work, tiny_model_dir)
    assert "all 5 stages ok" in out
    return work


def _log(work: Path, stage: str) -> str:
    return (work / "logs" / f"{stage}.log").read_text(errors="replace")


def test_each_stage_starts_from_the_previous_stage_export_through_the_configs_own_paths(chain):
    assert "loaded .cache/tiny" in _log(chain, "sft")
    assert "loaded runs/sft/hf" in _log(chain, "rl") and "vLLM engine ready on runs/sft/hf" in _log(chain, "rl")
    assert "loaded runs/rl/hf" in _log(chain, "rc")
    summary = json.loads((chain / "runs/eval/imo_proofbench/summary.json").read_text())
    assert "runs/rc/hf" in json.dumps(summary)
    for stage in ("sft", "rl", "rc"):  # resumable, and exported where the next stage looks
        assert (chain / f"runs/{stage}/checkpoints/last.ckpt").exists(), stage  # a folder: FSDP2 saves shards
        assert (chain / f"runs/{stage}/hf/model.safetensors").is_file(), stage
        assert not (chain / f"runs/{stage}/.qed-run.lock").exists(), stage  # released at the end


def test_the_rl_step_batch_is_the_configs_global_batch(chain):
    rows = read_metrics(chain / "runs/rl")
    # data.prompts_per_step 2 (for the whole job) x model.group_size 4
    assert series(rows, "rollout/sequences") == [8.0, 8.0]
    assert series(rows, "val/reward_mean")  # the config's validation ran


def test_validate_with_a_checkpoint_writes_its_own_metrics_apart_from_the_curves(chain):
    validate = chain / "runs/rl/validate/version_0/metrics.csv"
    assert validate.is_file() and "val/reward_mean" in validate.read_text()
    assert [p.name for p in (chain / "runs/rl/csv").iterdir()] == ["version_0"]  # the training curves: one run


def test_stage3_used_the_summarizer_server_of_its_config(chain):
    rows = read_metrics(chain / "runs/rc")
    assert series(rows, "rc/summarizer_s") and series(rows, "rc/summarizer_s")[0] > 0
    assert "QED_SUMMARIZER_URLS" not in _log(chain, "rc")  # resolved, not left as a literal
    assert series(rows, "rollout/sequences") == [16.0, 16.0]  # 2 problems x 2 states x G=4


def test_two_processes_train_the_same_global_batch(chain, tiny_model_dir, tmp_path):
    _rehearse(tmp_path, tiny_model_dir, "--devices", "2", "--stages", "sft,rl,validate")
    rows = read_metrics(tmp_path / "runs/rl")
    assert series(rows, "rollout/sequences") == series(read_metrics(chain / "runs/rl"), "rollout/sequences")
    assert (tmp_path / "runs/rl/validate/version_0/metrics.csv").is_file()
    assert "rank 1 of 2" in _log(tmp_path, "rl")  # one engine per training process


@pytest.mark.parametrize("layout", ["one_node_async", "pipeline_rl"])
def test_stage2_runs_in_each_layout_config(layout, chain, tiny_model_dir, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/sft").symlink_to(chain / "runs/sft")  # stage 1's export, as the chain left it
    _rehearse(tmp_path, tiny_model_dir, "--stages", "rl", "--layout", layout)
    rows = read_metrics(tmp_path / "runs/rl")
    assert series(rows, "rollout/sequences") == [8.0, 8.0]
    assert (tmp_path / "runs/rl/hf/model.safetensors").is_file()
