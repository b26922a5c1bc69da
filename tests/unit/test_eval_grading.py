"""The eval grading path: `<points>` replies through `ProofBenchJudge`, self-evaluation stripping for every judge,
and how failures reach the metrics."""

from __future__ import annotations

import math

import pytest
import torch
from fakes import FakeJudgeClient, proof_in

from qed_lightning.eval.benchmarks import EvalProblem, without_self_evaluation
from qed_lightning.eval.metrics import ProofScore
from qed_lightning.rewards import ProofBenchJudge, RubricJudge

PROBLEM = EvalProblem("p1", "Prove that 1 + 1 = 2.", reference_solution="By definition.",
                      guidelines="(Partial) 1. Tries.", rubric="## Checkpoints (7 pts total)\n- **7 pts**: the proof")

# hand-written judge replies and the score the IMO-ProofBench protocol reads from each (None = unparsable)
REPLIES = {
    "A": ("The argument is complete and rigorous.\n<points>7 out of 7</points>", 7),
    "B": ("Good start, but the key lemma is unproved. <points>1 out of 7</points>", 1),
    "C": ("First impression <points>7 out of 7</points>; on checking step 3 fails: <points>6 out of 7</points>", 6),
    "D": ("Nothing of value.\n\n<points> 0 out of 7 </points>", 0),
    "E": ("I would give it 7/7: <points>7/7</points>", None),  # not the protocol's form
    "F": ("<points>8 out of 7</points>", None),  # out of range
    "G": ("The proof is fine. Score: 7 out of 7.", None),  # no tag at all
}


def _judge(cls=ProofBenchJudge):
    client = FakeJudgeClient(lambda prompt: REPLIES[proof_in(prompt)[0]][0])
    return cls(client), client


def test_points_replies_become_scores_and_failures():
    judge, client = _judge()
    grades = judge.grade([PROBLEM.grade_request(f"<think>...</think>{key}. The proof.") for key in REPLIES])
    assert [g.score for g in grades] == [want for _, want in REPLIES.values()]
    assert [g.status for g in grades] == ["ok"] * 4 + ["parse_fail"] * 3
    assert [g.reward for g in grades] == [1.0, 1 / 7, 6 / 7, 0.0, 0.0, 0.0, 0.0]  # on_failure="zero"
    assert len(client.prompts) == 7
    # the failures reach the report as failures, not as real zeros
    metric = ProofScore()
    metric.update(torch.tensor([math.nan if g.score is None else float(g.score) for g in grades]),
                  torch.arange(7), torch.zeros(7, dtype=torch.long))
    out = metric.compute()
    assert out["failure_rate"].item() == pytest.approx(3 / 7)
    assert out["score_pct"].item() == pytest.approx(100 * (7 + 1 + 6 + 0) / 7 / 7)  # failures count 0 (paper)


@pytest.mark.parametrize("judge_cls", [ProofBenchJudge, RubricJudge])
def test_self_evaluation_is_cut_before_any_judge_sees_the_proof(judge_cls):
    judge, client = _judge(judge_cls)
    client.reply = lambda prompt: "<points>7 out of 7</points><score>7</score>"
    response = ("<think>I will add a ## Self-Evaluation later.</think>\nA. Since 1 + 1 = 2 by definition, done.\n\n"
                "## Self-Evaluation\nThis proof is flawless: 7/7.")
    judge.grade([PROBLEM.grade_request(response)])
    graded = proof_in(client.prompts[-1])
    assert graded == "A. Since 1 + 1 = 2 by definition, done."


def test_without_self_evaluation_leaves_thinking_and_plain_proofs_alone():
    assert without_self_evaluation("<think>x</think>Proof. QED.") == "<think>x</think>\nProof. QED."
    assert without_self_evaluation("Proof.\n\n**Self-Evaluation:** 7/7") == "Proof."
    assert without_self_evaluation("<think>unfinished") == "<think>unfinished"


def test_a_judge_that_needs_a_reference_is_refused_for_a_rubric_benchmark(tmp_path, samples_dir):
    from qed_lightning.eval import Evaluator, ProofBench

    judge, _ = _judge(ProofBenchJudge)
    with pytest.raises(ValueError, match="RubricJudge") as err:
        Evaluator(model="m", benchmark=ProofBench(str(samples_dir / "proofbench.jsonl")), judge=judge,
                  output_dir=str(tmp_path))
    assert "reference_solution" in str(err.value)
    audit, _ = _judge(ProofBenchJudge)  # the audit judge is checked the same way, and named as such
    with pytest.raises(ValueError, match="the audit_judge ProofBenchJudge needs") as err:
        Evaluator(model="m", benchmark=ProofBench(str(samples_dir / "proofbench.jsonl")), judge=_judge(RubricJudge)[0],
                  audit_judge=audit, output_dir=str(tmp_path))
    assert "the judge " not in str(err.value)


def test_agreement_with_the_bundled_human_grades(samples_dir, tmp_path):
    from qed_lightning.data.loading import DataError
    from qed_lightning.eval import IMOProofBench
    from qed_lightning.eval.agreement import judge_agreement, load_human_grades

    problems = {p.problem_id: p for p in IMOProofBench(str(samples_dir / "imo_proofbench.jsonl")).load()}
    grades = load_human_grades(str(samples_dir / "judge_agreement.jsonl"), problems)
    assert len(grades) == 12 and len({g.problem_id for g in grades}) == 4
    assert {g.human_score for g in grades} == {0, 1, 6, 7}  # the IMO-ProofBench scale
    # a judge that agrees with the humans (it looks the proof up) has zero error; its prompts carry no self-evaluation
    by_proof = {g.response.split("## Self-Evaluation")[0].strip(): g.human_score for g in grades}
    client = FakeJudgeClient(lambda prompt: f"<points>{by_proof[proof_in(prompt)]} out of 7</points>")
    numbers, records = judge_agreement(ProofBenchJudge(client), problems, grades)
    assert numbers == {"mae": 0.0, "bucket_accuracy": 1.0, "advantage_mae": 0.0, "n": 12.0, "failure_rate": 0.0}
    assert [r["judge_score"] for r in records] == [g.human_score for g in grades]
    assert not any("Self-Evaluation" in p for p in client.prompts)

    bad = tmp_path / "human.jsonl"
    bad.write_text('{"problem_id": "PB-Basic-001", "response": "Proof.", "human_score": 8}\n'
                   '{"problem_id": "nope", "response": "Proof.", "human_score": 7}\n')
    with pytest.raises(DataError, match=r"line 1, column 'human_score': expected an integer score 0..7, got 8"):
        load_human_grades(str(bad), problems)
    bad.write_text('{"problem_id": "nope", "response": "Proof.", "human_score": 7}\n')
    with pytest.raises(DataError, match=r"names problems the benchmark does not have \(line 1: 'nope'\)"):
        load_human_grades(str(bad), problems)
