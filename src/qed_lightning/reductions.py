"""How a step metric combines over data-parallel ranks, declared where the metric is made.

Each rank generates, grades and trains on its own share of a step, so a metric one rank computes describes only
its share. The code that makes a metric says how the shares combine by its type: `Sum(x)` for counts (the ranks'
values add up: grades, calls, dropped samples), `Max(x)` for maxima and times (the slowest or largest rank: a phase
time, the longest latency), and a plain float for everything else (the mean over ranks: rates, fractions, means of
equal-sized shares). `Sum` and `Max` are floats, so everything that reads a metric reads them as numbers; arithmetic
on them gives plain floats, so wrap the final value. `combine` applies the declarations to every rank's metrics
(`RubricRLModule.log_step` gathers them first); a metric only some ranks report combines over those ranks.
A user's own counter in `log_step`'s metrics is summed when it is made as `Sum(n)`; a plain float is averaged.

No framework import: a stage module, a judge, a layout or a user's callback may make these.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Max", "Sum", "combine"]


class Sum(float):
    """A count: summed over ranks."""

    __slots__ = ()


class Max(float):
    """A maximum or a time: the largest rank's value."""

    __slots__ = ()


def combine(per_rank: Sequence[dict[str, float]]) -> dict[str, float]:
    """One dict of plain floats from every rank's metrics, each combined as its type declares (module docstring).

    >>> combine([{"n": Sum(2), "t": Max(1.5), "r": 0.2}, {"n": Sum(3), "t": Max(0.5), "r": 0.4, "x": 1.0}])
    {'n': 5.0, 't': 1.5, 'r': 0.30000000000000004, 'x': 1.0}
    """
    keys = list(dict.fromkeys(k for metrics in per_rank for k in metrics))
    out = {}
    for key in keys:
        values = [m[key] for m in per_rank if key in m]
        kind = type(values[0])
        if kind is Sum:
            out[key] = float(sum(values))
        elif kind is Max:
            out[key] = float(max(values))
        else:
            out[key] = sum(float(v) for v in values) / len(values)
    return out
