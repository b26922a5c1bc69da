"""`qed-eval` through its real entry point: the demo config with the tiny model on the CPU build of vLLM and the
scripted judge over HTTP, with a second (audit) judge grading the same samples by another rule, then the same command
again, which must resume without generating or grading anything (neither judge called)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qed_lightning.eval.cli import run
from qed_lightning.rollout.engines.vllm_engine import VLLMEngine

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs/eval/demo.yaml")
# the audit judge: another scripted rule (spaces counted: min(7, spaces)) over its own HTTP server
AUDIT_JUDGE = """
audit_judge:
  class_path: qed_lightning.rewards.ProofBenchJudge
  init_args:
    prompt: imo_proofbench_v1
    require_think_close: false
    client:
      class_path: qed_lightning.testing.ScriptedJudgeClient
      init_args: {rule: keyword, keyword: " "}
"""


@pytest.fixture
def engine_calls(monkeypatch) -> list[int]:
    """The number of prompts of every `VLLMEngine.generate` call (and -1 for every engine start)."""
    calls: list[int] = []
    real_generate, real_start = VLLMEngine.generate, VLLMEngine.start

    def generate(self, prompts, sampling, n=1):
        calls.append(len(prompts))
        return real_generate(self, prompts, sampling, n)

    def start(self, model=None):
        calls.append(-1)
        return real_start(self, model)

    monkeypatch.setattr(VLLMEngine, "generate", generate)
    monkeypatch.setattr(VLLMEngine, "start", start)
    return calls


@pytest.mark.slow
def test_demo_eval_reports_and_resumes_without_new_work(tiny_model_dir, tmp_path, capsys, judge_servers, engine_calls):
    (tmp_path / "audit.yaml").write_text(AUDIT_JUDGE)
    args = ["--config", DEMO, "--config", str(tmp_path / "audit.yaml"), "--model", str(tiny_model_dir),
            "--output_dir", str(tmp_path), "--max_new_tokens", "24"]
    first = run(args)
    table = capsys.readouterr().out
    assert engine_calls == [-1, 6]  # one start, then 3 problems x n=2 in a single batched call
    assert len(judge_servers) == 2  # the judge's server and the audit judge's
    posts = sum(server.posts for server in judge_servers)
    # every uncached grade was an HTTP request to a judge: 6 by the judge, the same 6 samples by the audit judge
    assert posts == first["this_run"]["judge/calls"] + first["audit"]["this_run"]["judge/calls"] == 12
    assert first["this_run"]["judge/ok"] == 6 and first["this_run"]["generated"] == 6

    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sorted((r["problem_id"], r["sample"], r["scaffold"]) for r in rows) == [
        (pid, k, "direct") for pid in ("PB-Basic-001", "PB-Basic-002", "PB-Basic-003") for k in (0, 1)]
    for row in rows:
        assert row["status"] == "ok" and 0 <= row["score"] <= 7 and "<points>" in row["judge_reply"]
        assert 0 < row["tokens"] <= 24 and row["prompt"].startswith("Generate a rigorous proof")
    overall = first["scaffolds"]["direct"]["overall"]
    assert overall["n"] == 6 and overall["runs"] == 2 and overall["problems"] == 3
    assert overall["score_pct"] == pytest.approx(100 * sum(r["score"] for r in rows) / 42)
    assert json.loads((tmp_path / "summary.json").read_text())["scaffolds"] == first["scaffolds"]
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "score %" in table and "category: Number Theory" in table and f"{overall['score_pct']:.1f}" in table
    # the audit: both judges' grades of the same samples, and their agreement computed here by hand from them
    audit, audited = first["audit"], [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    by_key = {(r["problem_id"], r["sample"]): r for r in rows}
    assert sorted((a["problem_id"], a["sample"]) for a in audited) == sorted(by_key)
    for a in audited:
        output = by_key[(a["problem_id"], a["sample"])]["output"]
        assert a["audit_status"] == "ok" and a["score"] == by_key[(a["problem_id"], a["sample"])]["score"]
        assert a["audit_score"] == min(7, output.split("</think>")[-1].strip().count(" ")), a  # the audit rule
    diffs = [abs(a["score"] - a["audit_score"]) for a in audited]
    assert audit["samples"] == 6 and audit["failed"] == 0 and "keyword" not in audit["judge"]
    assert audit["judge_score_mean"] == pytest.approx(sum(a["score"] for a in audited) / 42)
    assert audit["audit_score_mean"] == pytest.approx(sum(a["audit_score"] for a in audited) / 42)
    assert audit["gap"] == pytest.approx(audit["judge_score_mean"] - audit["audit_score_mean"])
    assert audit["mae"] == pytest.approx(sum(diffs) / 6)
    assert audit["agree_within_1"] == pytest.approx(sum(d <= 1 for d in diffs) / 6)
    assert audit["spearman"] is None or -1 <= audit["spearman"] <= 1
    assert json.loads((tmp_path / "summary.json").read_text())["audit"] == audit
    assert "judge audit" in table and f"{audit['mae']:.2f}" in table

    samples_before = (tmp_path / "samples.jsonl").read_text()
    judge_servers.clear()
    second = run(args)
    assert engine_calls == [-1, 6]  # no engine start and no generation on the rerun
    assert sum(server.posts for server in judge_servers) == 0  # not a single judge request
    assert second["this_run"]["generated"] == 0 and second["this_run"]["graded"] == 0
    assert (tmp_path / "samples.jsonl").read_text() == samples_before
    assert second["scaffolds"] == first["scaffolds"]
    assert second["audit"]["this_run"]["judge/cache_hits"] == 6  # the audit's grades from its own cache
    assert {k: v for k, v in second["audit"].items() if k != "this_run"} == {
        k: v for k, v in first["audit"].items() if k != "this_run"}
    assert "score %" in capsys.readouterr().out


def test_agreement_subcommand_grades_human_samples_once(tmp_path, capsys, judge_servers):
    args = ["agreement", "--config", DEMO, "--output_dir", str(tmp_path),
            "--human_grades", str(REPO / "data/samples/judge_agreement.jsonl")]
    first = run(args)
    assert first["agreement"]["n"] == 12 and first["this_run"]["judge/calls"] == 12
    assert sum(server.posts for server in judge_servers) == 12
    records = [json.loads(line) for line in (tmp_path / "agreement.jsonl").read_text().splitlines()]
    assert {r["human_score"] for r in records} == {0, 1, 6, 7}
    assert all(r["status"] == "ok" for r in records)
    assert "bucket accuracy" in capsys.readouterr().out
    second = run(args)  # every grade comes from the grade cache
    assert second["this_run"]["judge/calls"] == 0 and second["this_run"]["judge/cache_hits"] == 12
    assert second["agreement"] == first["agreement"]


def test_transformers_engine_and_generate_verify_refine_on_the_tiny_model(tiny_model_dir, tmp_path):
    summary = run(["--config", DEMO, "--model", str(tiny_model_dir), "--output_dir", str(tmp_path), "--n", "1",
                   "--max_new_tokens", "8", "--benchmark.init_args.limit", "2",
                   "--engine", "qed_lightning.rollout.HFEngine",
                   "--scaffold", "qed_lightning.eval.GenerateVerifyRefine", "--scaffold.rounds", "1"])
    overall = summary["scaffolds"]["gvr"]["overall"]
    assert overall["n"] == 2 and summary["this_run"]["generated"] == 2
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    for row in rows:  # a first attempt plus one refinement (and a self-check when the attempt closed its thinking)
        assert row["calls"] in (2, 3) and len(row["trace"]) == 1 and 0 < row["tokens"] <= 3 * 8
