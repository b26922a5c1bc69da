"""Evaluation benchmarks: load a hub id or a local file, validate it, and turn each row into an `EvalProblem`.

Three shapes (SPEC 2, 6), one class each, chosen in a config by `class_path`:
- `IMOProofBench`: problem, reference solution and grading guidelines (graded by `ProofBenchJudge`, 0/1/6/7 scale);
- `ProofBench`: problem and a `grading_scheme` list of `{title, points, desc}` (graded by `RubricJudge`);
- `RubricBenchmark` (FineProofs-RL-test): problem and a markdown `rubrics` string (graded by `RubricJudge`).

Every class maps *our* field names onto the file's columns through `default_columns`, which a config's `columns`
overrides one field at a time (e.g. `columns: {problem: Problem}`). Validation runs before any model loads and names
the row and column of every problem found (`qed_lightning.data.loading`). A row without a `problem_id` column gets
the id `row-<index>-<sha of the problem>`, stable across runs of the same file, since ids key resumed samples.

`EvalProblem.grade_request` is the one door to the judge in evaluation: it cuts a trailing "Self Evaluation"-style
section from the final proof (`without_self_evaluation`) for every judge, the rubric judge included.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qed_lightning.data.loading import DataError, Table, load_table
from qed_lightning.data.rubric import check_rubric, render_rubric
from qed_lightning.data.validation import Check, nonempty_str, remap, validate_rows
from qed_lightning.rewards.parsing import THINK_CLOSE, strip_self_evaluation
from qed_lightning.rewards.types import GradeRequest

__all__ = ["Benchmark", "EvalProblem", "IMOProofBench", "ProofBench", "RubricBenchmark", "without_self_evaluation"]

META_FIELDS = ("category", "level", "source")


def without_self_evaluation(response: str) -> str:
    """The response with a trailing self-grading section cut from its final proof (the thinking is left alone).

    >>> without_self_evaluation("<think>## Self-Evaluation here is fine</think>Proof.\\n## Self-Evaluation\\n7/7")
    '<think>## Self-Evaluation here is fine</think>\\nProof.'
    >>> without_self_evaluation("Proof.\\n**Self-assessment:** full marks")
    'Proof.'
    """
    head, sep, tail = response.rpartition(THINK_CLOSE)
    if not sep:
        return strip_self_evaluation(response)
    return f"{head}{sep}\n{strip_self_evaluation(tail.strip())}"


@dataclass(frozen=True)
class EvalProblem:
    """One benchmark problem with what its judge needs; `meta` holds the grouping fields (category, level, source)."""

    problem_id: str
    problem: str
    reference_solution: str | None = None
    guidelines: str | None = None
    rubric: str | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def grade_request(self, response: str) -> GradeRequest:
        """The judge's request for one response, its self-evaluation section cut (`without_self_evaluation`);
        fields this benchmark lacks stay None (the judge refuses them)."""
        return GradeRequest(problem=self.problem, rubric=self.rubric,  # type: ignore[arg-type]
                            response=without_self_evaluation(response),
                            reference_solution=self.reference_solution, guidelines=self.guidelines)


def _optional_str(value: Any) -> str | None:
    return None if value is None or isinstance(value, str | int) else f"expected a string, got {type(value).__name__}"


class Benchmark:
    """Base of the benchmark loaders. Subclasses set `checks`, `default_columns` and `provides`.

    Args:
        path: hub id or local .jsonl/.json/.parquet file.
        subset: hub config name. split: hub split.
        columns: our field -> the file's column, overriding `default_columns` (fields: problem_id, problem,
            category, level, source, and the benchmark's own, e.g. reference_solution, guidelines, rubric).
        limit: keep the first `limit` problems (after `problem_ids`); None = all.
        problem_ids: keep only these problem ids, in file order; None = all.
    """

    checks: ClassVar[dict[str, Check]] = {"problem": nonempty_str}
    default_columns: ClassVar[dict[str, str]] = {}
    #: the GradeRequest fields this benchmark fills, checked against the judge's `request_fields`
    provides: ClassVar[frozenset[str]] = frozenset({"problem"})

    def __init__(
        self,
        path: str,
        subset: str | None = None,
        split: str = "train",
        columns: dict[str, str] | None = None,
        limit: int | None = None,
        problem_ids: list[str] | None = None,
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"benchmark.limit must be >= 1 or null (all problems), got {limit}.")
        self.path, self.subset, self.split = path, subset, split
        self.user_columns = dict(columns or {})
        self.columns = {**self.default_columns, **self.user_columns}
        self.limit = limit
        self.problem_ids = list(problem_ids) if problem_ids is not None else None

    @property
    def name(self) -> str:
        return type(self).__name__

    def load(self, select: bool = True) -> list[EvalProblem]:
        """Read, validate and convert every row; raises `DataError` naming each bad row and column.

        `select=False` ignores `limit` and `problem_ids` (judge agreement looks problems up by id)."""
        table = load_table(self.path, subset=self.subset, split=self.split)
        validate_rows(table, self.checks, self.columns)
        self._check_optional_columns(table)
        problems = [self.to_problem(i, row) for i, row in enumerate(table.rows)]
        self._check_unique_ids(problems, table)
        return self._select(problems) if select else problems

    def _check_optional_columns(self, table: Table) -> None:
        have = {k for row in table.rows for k in row}
        optional = {f: self.columns.get(f, f) for f in ("problem_id", *META_FIELDS)}
        mapped = [f"{f} -> {c!r}" for f, c in optional.items() if f in self.user_columns and c not in have]
        if mapped:
            raise DataError(f"{self.path}: the benchmark's `columns` maps {', '.join(mapped)}, but the file has no "
                            f"such column; it has {sorted(have)}.")
        present = {f: c for f, c in optional.items() if c in have}
        validate_rows(table, {f: _optional_str for f in present}, present, required=False)

    def to_problem(self, index: int, row: dict[str, Any]) -> EvalProblem:
        """One validated row as an `EvalProblem` (override to read other fields)."""
        fields = remap(row, self.columns, ["problem_id", "problem", *META_FIELDS])
        meta = {k: str(fields[k]) for k in META_FIELDS if fields[k] not in (None, "")}
        return EvalProblem(self._problem_id(index, fields), fields["problem"], meta=meta)

    def _problem_id(self, index: int, fields: dict[str, Any]) -> str:
        if fields["problem_id"] not in (None, ""):
            return str(fields["problem_id"])
        digest = hashlib.sha256(fields["problem"].encode("utf-8")).hexdigest()[:8]
        return f"row-{index}-{digest}"

    def _check_unique_ids(self, problems: list[EvalProblem], table: Table) -> None:
        counts = Counter(p.problem_id for p in problems)
        duplicates = {pid: [table.positions[i] for i, p in enumerate(problems) if p.problem_id == pid]
                      for pid, c in counts.items() if c > 1}
        if duplicates:
            listed = "; ".join(f"{pid!r} in {table.unit}s {rows}" for pid, rows in list(duplicates.items())[:10])
            column = self.columns.get("problem_id", "problem_id")
            raise DataError(f"{self.path}: column {column!r} must be unique (it keys resumed samples): {listed}.")

    def _select(self, problems: list[EvalProblem]) -> list[EvalProblem]:
        if self.problem_ids is not None:
            known = {p.problem_id for p in problems}
            unknown = [pid for pid in self.problem_ids if pid not in known]
            if unknown:
                raise DataError(f"{self.path}: benchmark.problem_ids {unknown} are not in the file "
                                f"(first ids: {sorted(known)[:5]}).")
            wanted = set(self.problem_ids)
            problems = [p for p in problems if p.problem_id in wanted]
        return problems[: self.limit] if self.limit is not None else problems


class IMOProofBench(Benchmark):
    """IMO-ProofBench: problem, reference solution (`solution`), grading guidelines (`grading_guidelines`).

    Grade it with `ProofBenchJudge` (reference solution + guidelines, 0/1/6/7 scale, `<points>N out of 7</points>`).
    Arguments as for `Benchmark`.
    """

    checks = {"problem": nonempty_str, "reference_solution": nonempty_str, "guidelines": nonempty_str}
    default_columns = {"reference_solution": "solution", "guidelines": "grading_guidelines"}
    provides = frozenset({"problem", "reference_solution", "guidelines"})

    def __init__(self, path: str = "lm-provers/IMOProofBench", subset: str | None = None, split: str = "train",
                 columns: dict[str, str] | None = None, limit: int | None = None,
                 problem_ids: list[str] | None = None) -> None:
        super().__init__(path, subset, split, columns, limit, problem_ids)

    def to_problem(self, index: int, row: dict[str, Any]) -> EvalProblem:
        base = super().to_problem(index, row)
        fields = remap(row, self.columns, ["reference_solution", "guidelines"])
        return EvalProblem(base.problem_id, base.problem, fields["reference_solution"], fields["guidelines"],
                           meta=base.meta)


class RubricBenchmark(Benchmark):
    """A problem with a marking scheme (FineProofs-RL-test: markdown `rubrics`), graded by `RubricJudge`.

    The rubric may be markdown or a list of `{title, points, description}` items; either must be worth 7 points,
    and it reaches the judge through `render_rubric`. Arguments as for `Benchmark`.
    """

    checks = {"problem": nonempty_str, "rubric": check_rubric}
    default_columns = {"rubric": "rubrics"}
    provides = frozenset({"problem", "rubric"})

    def __init__(self, path: str = "lm-provers/FineProofs-RL-test", subset: str | None = None, split: str = "train",
                 columns: dict[str, str] | None = None, limit: int | None = None,
                 problem_ids: list[str] | None = None) -> None:
        super().__init__(path, subset, split, columns, limit, problem_ids)

    def to_problem(self, index: int, row: dict[str, Any]) -> EvalProblem:
        base = super().to_problem(index, row)
        rubric = render_rubric(remap(row, self.columns, ["rubric"])["rubric"])
        return EvalProblem(base.problem_id, base.problem, rubric=rubric, meta=base.meta)


class ProofBench(RubricBenchmark):
    """ProofBench: problem and a `grading_scheme` list of `{title, points, desc}`, rendered by `render_rubric`.

    Arguments as for `Benchmark`.
    """

    default_columns = {"rubric": "grading_scheme"}

    def __init__(self, path: str = "lm-provers/ProofBench", subset: str | None = None, split: str = "train",
                 columns: dict[str, str] | None = None, limit: int | None = None,
                 problem_ids: list[str] | None = None) -> None:
        super().__init__(path, subset, split, columns, limit, problem_ids)
