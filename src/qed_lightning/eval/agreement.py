"""Judge agreement: grade human-graded samples with the configured judge and measure how closely it follows them.

Input: a JSONL/JSON/Parquet file with `problem_id` (a problem of the benchmark), `response` (a proof) and
`human_score` (0..7); `columns` maps these names onto other column names. A response without `</think>` is taken
as a final proof (it is graded as if the model had closed its thinking right before it). Output: `agreement.jsonl`
(one record per sample: human score, judge score, status, judge reply), `agreement.json` (the `JudgeAgreement`
numbers: MAE, bucket accuracy over {0}, {1-3}, {4-6}, {7}, within-problem advantage error, judge failure rate).
Grades go through the judge's grade cache, so a rerun costs no judge calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from qed_lightning.data.loading import DataError, load_table
from qed_lightning.data.validation import nonempty_str, remap, validate_rows
from qed_lightning.eval.benchmarks import EvalProblem
from qed_lightning.eval.metrics import JudgeAgreement
from qed_lightning.rewards.parsing import THINK_CLOSE

__all__ = ["HumanGrade", "as_final_proof", "judge_agreement", "load_human_grades"]

FIELDS = ["problem_id", "response", "human_score"]


@dataclass(frozen=True)
class HumanGrade:
    problem_id: str
    response: str
    human_score: int


def _score_0_to_7(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 7:
        return f"expected an integer score 0..7, got {value!r}"
    return None


def _id(value: Any) -> str | None:
    return None if isinstance(value, str | int) and str(value).strip() else f"expected a problem id, got {value!r}"


def load_human_grades(path: str, problems: dict[str, EvalProblem],
                      columns: dict[str, str] | None = None) -> list[HumanGrade]:
    """Read and validate human-graded samples; every problem id must belong to the benchmark."""
    table = load_table(path)
    validate_rows(table, {"problem_id": _id, "response": nonempty_str, "human_score": _score_0_to_7}, columns)
    grades = [HumanGrade(str(f["problem_id"]), f["response"], f["human_score"])
              for f in (remap(row, columns, FIELDS) for row in table.rows)]
    unknown = [f"{table.unit} {line}: {g.problem_id!r}" for line, g in zip(table.positions, grades, strict=True)
               if g.problem_id not in problems]
    if unknown:
        column = (columns or {}).get("problem_id", "problem_id")
        raise DataError(f"{path}: column {column!r} names problems the benchmark does not have "
                        f"({'; '.join(unknown[:10])}); the benchmark's ids start {sorted(problems)[:5]}.")
    return grades


def as_final_proof(response: str) -> str:
    """A response as the judge should see it: unchanged if it closed its thinking, else marked as a final proof.

    >>> as_final_proof("Proof. Done.")
    '</think>\\nProof. Done.'
    >>> as_final_proof("<think>x</think>Proof.")
    '<think>x</think>Proof.'
    """
    return response if THINK_CLOSE in response else f"{THINK_CLOSE}\n{response}"


def judge_agreement(judge, problems: dict[str, EvalProblem],
                    grades: list[HumanGrade]) -> tuple[dict[str, float], list[dict]]:
    """Grade every human-graded sample with `judge`; returns (agreement numbers, per-sample records)."""
    verdicts = judge.grade([problems[g.problem_id].grade_request(as_final_proof(g.response)) for g in grades])
    index = {pid: i for i, pid in enumerate(dict.fromkeys(g.problem_id for g in grades))}
    metric = JudgeAgreement()
    metric.update(
        problem=torch.tensor([index[g.problem_id] for g in grades]),
        judge=torch.tensor([math.nan if v.score is None else float(v.score) for v in verdicts]),
        human=torch.tensor([float(g.human_score) for g in grades]),
    )
    numbers = {name: float(value) for name, value in metric.compute().items()}
    records = [{"problem_id": g.problem_id, "human_score": g.human_score, "judge_score": v.score, "status": v.status,
                "judge_reply": v.reply, "response": g.response} for g, v in zip(grades, verdicts, strict=True)]
    return numbers, records

