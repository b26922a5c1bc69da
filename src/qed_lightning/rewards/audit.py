"""Judge audit arithmetic: how far the training judge and a second (audit) judge agree on the same rollouts, whether
the gap between them is growing, and cheap signals of reward hacking read from a step's rollout records.

Pure functions of scores and records (no model, no trainer), used by `callbacks.JudgeAudit`.

Scale: judges score 0..7; a score's reward here is score / 7, for both judges, so `gap` (training minus audit, in
[-1, 1]) measures the judges' disagreement only, not the overlong penalty or banding the training reward may carry.
`agree_within_1` and `mae` are in points. `spearman` is the rank correlation (average ranks for ties), nan when either
side is constant or fewer than two pairs exist: a rank correlation of a constant is undefined, not 0.

The cheap signals (`hack_signals`): response-length drift against the run's first step, the share of repeated word
3-grams, character-level repetition (the share of a response's bytes zlib's compression removes: it also sees a
repeated run inside one "word", such as "aaaeeeiii...", which word n-grams miss; natural proofs of a few hundred to
a few thousand characters lose 0.3-0.6, a looping or degenerate one above 0.9), the share of GRPO groups whose scores
are all equal, and the share of scores at the top of the scale. They
often precede or accompany a hack, but each also fires on healthy runs (a policy that learns to be concise drifts in
length; a solved problem saturates), so they are flags to read, never the alarm: the audit judge's gap decides that.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["GapPolicy", "SIGNAL_LIMITS", "agreement", "char_repetition", "flagged", "hack_signals", "ranks",
           "repeated_ngram_share", "slope", "spearman"]

MAX_SCORE = 7

#: when a cheap signal is flagged (see the module docstring: flags, not the alarm)
SIGNAL_LIMITS = {"signal/length_drift": 0.5, "signal/repetition": 0.5, "signal/char_repetition": 0.8,
                 "signal/flat_groups": 0.75, "signal/saturated": 0.9}


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank.

    >>> ranks([10, 30, 20, 20])
    [1.0, 4.0, 2.5, 2.5]
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    if n < 2:
        return math.nan
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's of the average ranks); nan if either side is constant or n < 2.

    >>> spearman([1, 2, 3], [3, 2, 1]), spearman([1, 1], [0, 5])
    (-1.0, nan)
    """
    return _pearson(ranks(x), ranks(y)) if len(x) >= 2 else math.nan


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of `(x, y)` points; nan with fewer than two distinct x.

    >>> slope([(0, 0.1), (1, 0.3), (2, 0.5)])
    0.2
    """
    n = len(points)
    if n < 2:
        return math.nan
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return math.nan
    return round(sum((p[0] - mx) * (p[1] - my) for p in points) / sxx, 12)


def agreement(train_scores: Sequence[int], audit_scores: Sequence[int]) -> dict[str, float]:
    """The audit numbers of one sample: both judges' scores (0..7) of the same rollouts, failed audits left out."""
    n = len(train_scores)
    if n == 0 or n != len(audit_scores):
        raise ValueError(f"agreement needs equally many scores on both sides (>= 1), got {n} and {len(audit_scores)}")
    train = sum(train_scores) / n / MAX_SCORE
    audit = sum(audit_scores) / n / MAX_SCORE
    diffs = [abs(a - b) for a, b in zip(train_scores, audit_scores, strict=True)]
    return {"audit/score_mean": audit, "audit/train_score_mean": train, "audit/gap": train - audit,
            "audit/agree_within_1": sum(d <= 1 for d in diffs) / n, "audit/mae": sum(diffs) / n,
            "audit/spearman": spearman(train_scores, audit_scores)}


@dataclass
class GapPolicy:
    """Raises the alarm when the gap exceeds `max_gap` in `patience` consecutive audits; `trend_window` audits give
    the gap's trend (slope per step).

    >>> p = GapPolicy(max_gap=0.3, patience=2)
    >>> [p.update(step, gap) for step, gap in [(0, 0.4), (1, 0.1), (2, 0.5), (3, 0.6)]]
    [False, False, False, True]
    """

    max_gap: float = 0.3
    patience: int = 1
    trend_window: int = 5
    history: list[tuple[int, float]] = field(default_factory=list)
    over: int = 0

    def update(self, step: int, gap: float) -> bool:
        """Record the gap of `step`'s audit; True when the alarm should go off now."""
        self.history.append((step, gap))
        self.over = self.over + 1 if gap > self.max_gap else 0
        return self.over >= self.patience

    def trend(self) -> float:
        return slope(self.history[-self.trend_window:])


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of a text's word n-grams that repeat an earlier one (0 for a text of fewer than n + 1 words).

    >>> repeated_ngram_share("a b c a b c a b c")
    0.5714285714285714
    """
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return sum(c - 1 for c in Counter(grams).values()) / len(grams)


def char_repetition(text: str) -> float:
    """Share of a text's UTF-8 bytes that zlib (level 9) removes, 0 when compression does not shrink it (short texts:
    zlib's own overhead); repeated runs of characters, within a word or across words, push it towards 1.

    >>> char_repetition("ab"), round(char_repetition("aeiou" * 100), 2)
    (0.0, 0.96)
    """
    raw = text.encode("utf-8")
    return max(0.0, 1 - len(zlib.compress(raw, 9)) / len(raw)) if raw else 0.0


def hack_signals(records: Sequence[dict], first_length: float | None) -> dict[str, float]:
    """The cheap signals of a step's rollout records (module docstring); `first_length` is the mean completion
    length of the run's first step (None: this is the first, drift 0)."""
    if not records:
        return {}
    lengths = [float(r.get("completion_tokens") or 0) for r in records]
    mean_len = sum(lengths) / len(lengths)
    base = first_length if first_length else mean_len
    groups: dict[tuple, list] = defaultdict(list)
    for r in records:
        groups[(r.get("group"), r.get("problem_id"))].append(r.get("score"))
    scored = [r["score"] for r in records if r.get("score") is not None]
    texts = [r.get("proof") or r.get("completion") or "" for r in records]
    return {
        "signal/length_mean": mean_len,
        "signal/length_drift": mean_len / base - 1 if base else 0.0,
        "signal/repetition": sum(repeated_ngram_share(t) for t in texts) / len(records),
        "signal/char_repetition": sum(char_repetition(t) for t in texts) / len(records),
        "signal/flat_groups": (sum(len(set(s)) == 1 for s in groups.values() if len(s) > 1)
                               / max(sum(len(s) > 1 for s in groups.values()), 1)),
        "signal/saturated": sum(s == MAX_SCORE for s in scored) / len(scored) if scored else 0.0,
    }


def flagged(signals: dict[str, float]) -> list[str]:
    """The signals past their `SIGNAL_LIMITS` (length drift in either direction).

    >>> flagged({"signal/length_drift": -0.6, "signal/repetition": 0.1, "signal/saturated": 0.95})
    ['signal/length_drift', 'signal/saturated']
    """
    return [k for k, limit in SIGNAL_LIMITS.items() if k in signals and abs(signals[k]) > limit]
