"""Rollout records and run folders read back for the report: the pure parts, without a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qed_lightning.data.records import ProofProblem
from qed_lightning.report import RolloutLog, RunNotFound, load_run, parse_rollout_log, read_metrics, read_rollouts
from qed_lightning.report.html import render_report
from qed_lightning.report.records import rollout_records, step_file
from qed_lightning.rewards.types import Grade
from qed_lightning.rollout.base import Completion


def test_parse_rollout_log_accepts_the_three_forms_and_names_the_flag():
    assert [parse_rollout_log(v) for v in ("all", "OFF", " sample:3 ")] == [None, 0, 3]
    for bad in ("sample:0", "sample:x", "some", "sample"):
        with pytest.raises(ValueError, match="model.rollout_log must be 'all', 'off' or 'sample:N'"):
            parse_rollout_log(bad)


def test_sample_draw_is_seeded_by_step_and_split_over_ranks():
    records = [{"i": i} for i in range(10)]
    log = RolloutLog("sample:4", seed=1)
    first, again = log.select(records, step=3), log.select(records, step=3)
    assert first == again and len(first) == 4  # a resumed run draws the same records
    assert log.select(records, step=4) != first  # another step, another draw
    assert len(log.select(records, step=3, rank=1, world_size=2)) == 2  # ceil(4 / 2) per rank
    assert RolloutLog("all").select(records, 0) == records and RolloutLog("off").select(records, 0) == []


def test_records_carry_what_the_browser_shows():
    problems = [ProofProblem(7, "Show x.", "# Rubric\n1. (7 pts) all", "src", [1, 2]),
                ProofProblem(9, "Show y.", "rubric y", "src", [1, 3], cycle=1, replayed=True, summary="I tried.")]
    rollouts = [Completion([1, 2], [5, 6, 7], [-0.1] * 3, "stop", "<think>hm</think> proof A", policy_version=4),
                Completion([1, 2], [5], [-0.2], "length", "<think>no end", policy_version=4),
                Completion([1, 3], [8, 9], [-0.3] * 2, "stop", "<think>a</think>B", policy_version=4),
                Completion([1, 3], [8], [-0.4], "stop", "<think>b</think>C", policy_version=4)]
    grades = [Grade(5, 5 / 7, "ok", "<score>5</score>"), Grade(0, 0.0, "truncated"),
              Grade(None, 0.0, "parse_fail", "no score"), Grade(7, 1.0, "ok", "<score>7</score>", cached=True)]
    rewards, valid = torch.tensor([5 / 7, 0.0, 0.0, 1.0]), torch.tensor([True, True, True, True])
    advantages = torch.tensor([5 / 14, -5 / 14, -0.5, 0.5])
    recs = rollout_records(problems, rollouts, grades, rewards, valid, advantages, step=3,
                           decode=lambda ids: f"prompt{ids}", proof_of=lambda t: t.rpartition("</think>")[2].strip())
    assert [r["problem_id"] for r in recs] == [7, 7, 9, 9] and [r["sample"] for r in recs] == [0, 1, 0, 1]
    assert recs[0]["proof"] == "proof A" and recs[1]["proof"] is None  # a truncated rollout was never graded
    assert recs[0]["prompt"] == "prompt[1, 2]" and recs[0]["rubric"].startswith("# Rubric")
    assert (recs[0]["score"], recs[0]["status"], recs[0]["judge_reply"]) == (5, "ok", "<score>5</score>")
    assert recs[1]["finish_reason"] == "length" and recs[0]["completion_tokens"] == 3 and recs[0]["prompt_tokens"] == 2
    assert recs[2]["score"] is None and recs[2]["status"] == "parse_fail" and recs[3]["judge_cached"] is True
    assert recs[0]["advantage"] == pytest.approx(5 / 14) and recs[0]["policy_version"] == 4 and recs[0]["step"] == 3
    assert "cycle" not in recs[0] and (recs[2]["cycle"], recs[2]["replayed"], recs[2]["state"]) == (1, True, "I tried.")


def test_step_files_are_atomic_and_a_resume_forgets_the_steps_it_redoes(tmp_path):
    for step in range(4):
        RolloutLog.write(tmp_path, step, [{"step": step, "k": k} for k in range(3)])
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == [f"step_{s:06d}.jsonl" for s in range(4)]
    removed = RolloutLog.forget_from(tmp_path, 2)  # a run resumed from the checkpoint of step 2 redoes steps 2, 3
    assert [p.name for p in removed] == ["step_000002.jsonl", "step_000003.jsonl"]
    RolloutLog.write(tmp_path, 2, [{"step": 2, "k": 9}])
    assert [(r["step"], r["k"]) for r in read_rollouts(tmp_path)] == \
        [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 9)]
    assert [r["k"] for r in read_rollouts(tmp_path, per_step=2)][:2] == [0, 2]  # spread over the step's records
    assert not list((tmp_path / "rollouts").glob(".*"))  # no temporary file left behind
    assert step_file(tmp_path, 12).name == "step_000012.jsonl"


def _csv(path: Path, rows: list[str]) -> None:
    path.mkdir(parents=True)
    (path / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_metrics_of_a_resumed_run_merge_its_versions(tmp_path):
    _csv(tmp_path / "csv/version_0",
         ["epoch,step,rollout/reward_mean,val/reward_mean", "0,0,0.1,", "0,1,0.2,", "0,1,,0.5", "0,2,0.9,"])
    _csv(tmp_path / "csv/version_1", ["epoch,step,rollout/reward_mean", "0,2,0.3", "0,3,0.4"])  # resumed at step 2
    metrics = read_metrics(tmp_path)
    assert metrics["rollout/reward_mean"] == [[0, 0.1], [1, 0.2], [2, 0.3], [3, 0.4]]  # the later version wins
    assert metrics["val/reward_mean"] == [[1, 0.5]] and "epoch" not in metrics


def test_load_run_tells_a_training_run_from_an_evaluation_and_refuses_other_folders(tmp_path):
    _csv(tmp_path / "train/csv/version_0", ["epoch,step,train/loss", "0,0,2.0"])
    RolloutLog.write(tmp_path / "train", 0, [{"step": 0, "problem_id": 1, "completion": "x"}])
    run = load_run(tmp_path / "train")
    assert run["kind"] == "train" and run["metrics"]["train/loss"] == [[0, 2.0]] and len(run["rollouts"]) == 1
    assert load_run(tmp_path / "train/csv/version_0")["rollouts"] == run["rollouts"]  # the version folder works too
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "summary.json").write_text(json.dumps({"benchmark": "b", "scaffolds": {}}))
    (evaluation / "samples.jsonl").write_text("".join(json.dumps(
        {"problem_id": "P1", "sample": k, "scaffold": "direct", "score": s, "status": "ok", "output": "o"}) + "\n"
        for k, s in enumerate([3, 5])))
    loaded = load_run(evaluation)
    assert loaded["kind"] == "eval" and [r["score"] for r in loaded["rollouts"]] == [3, 5]
    assert loaded["per_problem"] == [{"scaffold": "direct", "problem_id": "P1", "n": 2, "mean_score": 4.0}]
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFound, match="neither a training run"):
        load_run(tmp_path / "empty")


def _element(page: str, name: str):
    return json.loads(page.split(f'<script id="{name}" type="application/json">')[1].split("</script>")[0])


def test_page_embeds_its_data_so_no_text_can_end_the_script(tmp_path):
    run = {"name": "r", "kind": "train", "path": "p", "metrics": {"x": [[0, float("nan")]]}, "config": "",
           "rollouts": [{"completion": "</script><script>alert(1)</script>", "step": 0}]}
    page = render_report([run], title="a <b> title", warnings=["cut"])
    assert page.count("</script>") == 5  # three data elements, KaTeX and the page's code: nothing from the data
    assert "<title>a &lt;b&gt; title</title>" in page and "http://" not in page.split("<style>")[1].split("</style>")[0]
    assert _element(page, "qed-rollouts")[0][0]["completion"].startswith("</script>")
    assert _element(page, "qed-metrics") == [{"x": [[0, None]]}]  # JSON has no NaN; the curves in their own element
    data = _element(page, "qed-data")
    assert data["warnings"] == ["cut"] and "rollouts" not in data["runs"][0] and "metrics" not in data["runs"][0]
