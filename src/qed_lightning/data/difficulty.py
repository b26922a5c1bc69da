"""Difficulty-aware problem selection (`data.reward_mean_range`), from the base model's pass rate.

FineProofs-RL carries, per problem, the grades of 128 base-model (Qwen3-4B-Thinking-2507) rollouts: `scores` (0..7
each) and `reward_mean` (their mean / 7). A problem the base model always solves, or never makes progress on, gives
groups whose G rewards are mostly equal: no advantage, no gradient, full judge and GPU cost. `reward_mean_range:
[lo, hi]` keeps the problems whose pass rate lies in [lo, hi] (both ends included); the counts are logged
(`data/difficulty_kept`, `data/difficulty_dropped`).

The pass rate is `reward_mean` when the file has that column, else the mean of `scores` / 7. Both columns are
validated when the range is set (and only then: a run that does not use them does not need them): `reward_mean` a
number in [0, 1], `scores` a non-empty list of integers 0..7.

Paper's choice: the paper trains on all 5,227 problems (the range is off in `configs/rl.yaml`). Ours: the option,
shown with dynamic sampling in `configs/demo/rl_dapo.yaml`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qed_lightning.data.loading import DataError
from qed_lightning.data.validation import Check

__all__ = ["difficulty_checks", "in_range", "pass_rate", "reward_mean_value", "scores_value"]

MAX_SCORE = 7


def reward_mean_value(value: Any) -> str | None:
    """A check: a number in [0, 1].

    >>> reward_mean_value(0.25), reward_mean_value(1.5), reward_mean_value("0.3")
    (None, 'expected a number in [0, 1], got 1.5', "expected a number in [0, 1], got '0.3'")
    """
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    return None if ok else f"expected a number in [0, 1], got {value!r}"


def scores_value(value: Any) -> str | None:
    """A check: a non-empty list of integer scores 0..7.

    >>> scores_value([0, 7, 3]), scores_value([7, 8]), scores_value([])
    (None, 'score 8 (item 1) is not an integer 0..7', 'expected a non-empty list of scores 0..7, got []')
    """
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of scores 0..7, got {value!r}"
    for i, score in enumerate(value):
        if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= MAX_SCORE:
            return f"score {score!r} (item {i}) is not an integer 0..{MAX_SCORE}"
    return None


def difficulty_checks(file_columns: set[str], columns: Mapping[str, str] | None) -> dict[str, Check]:
    """The checks `reward_mean_range` needs, for the difficulty columns this file has; raises when it has neither."""
    columns = columns or {}
    checks = {field: check for field, check in (("reward_mean", reward_mean_value), ("scores", scores_value))
              if columns.get(field, field) in file_columns}
    if not checks:
        names = [columns.get("reward_mean", "reward_mean"), columns.get("scores", "scores")]
        raise DataError(f"data.reward_mean_range needs the base model's pass rate: a column {names[0]!r} or "
                        f"{names[1]!r}, which the file does not have (it has {sorted(file_columns)}); map it with "
                        "`columns: {reward_mean: your_column}` or unset data.reward_mean_range.")
    return checks


def pass_rate(reward_mean: Any, scores: Any) -> float:
    """`reward_mean` when present, else mean(scores) / 7.

    >>> pass_rate(0.5, [7, 0]), pass_rate(None, [7, 0, 0, 7])
    (0.5, 0.5)
    """
    if reward_mean is not None:
        return float(reward_mean)
    return sum(scores) / (MAX_SCORE * len(scores))


def in_range(rate: float, bounds: tuple[float, float]) -> bool:
    """Whether a pass rate lies in [lo, hi].

    >>> [in_range(r, (0.1, 0.9)) for r in (0.0, 0.1, 0.5, 0.9, 1.0)]
    [False, True, True, True, False]
    """
    lo, hi = bounds
    return lo <= rate <= hi
