"""What a training step measures: the times and progress of its named phases, and how each metric combines over ranks.
No framework import: a stage module, a judge, a layout or a user's callback may use it.

## Phases

The one mechanism that times a step's named phases and tells listeners about them. A module owns one `StepPhases`
(`self.phases`), reset at the start of every training step. Each named step of the step runs inside `with
self.phases.phase(name) as ph:`; the block's wall time adds up into `seconds[name]` (a name that repeats within a
step is summed), which is where the step's `time/{name}_s` metrics come from. A phase with a known amount of work
says so (`total=`, or `ph.total = ...` once known) and calls `ph.advance()` as it goes, so a progress display can
follow it: every listener in `listeners` is called with

    phase_started(name, total)          when the block is entered
    phase_advanced(name, completed, total)  on every `advance` (and when `total` is set)
    phase_ended(name, seconds)          when the block is left, normally or by an exception

A listener may implement any subset of the three (`PhaseListener` documents them, with no-op defaults).

## Combining over ranks

Declared where a metric is made. Each rank generates, grades and trains on its own share of a step, so a metric one
rank computes describes only its share. The code that makes a metric says how the shares combine by its type:
`Sum(x)` for counts (the ranks' values add up: grades, calls, dropped samples), `Max(x)` for maxima and times (the
slowest or largest rank: a phase time, the longest latency), and a plain float for everything else (the mean over
ranks: rates, fractions, means of equal-sized shares). `Sum` and `Max` are floats, so everything that reads a metric
reads them as numbers; arithmetic on them gives plain floats, so wrap the final value. `combine` applies the
declarations to every rank's metrics (`RubricRLModule.log_step` gathers them first); a metric only some ranks report
combines over those ranks. A user's own counter in `log_step`'s metrics is summed when it is made as `Sum(n)`; a
plain float is averaged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["Max", "Phase", "PhaseListener", "StepPhases", "Sum", "combine"]


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


class PhaseListener:
    """What `StepPhases` calls; subclass it or implement only the methods you need (any subset is accepted)."""

    def phase_started(self, name: str, total: int | None) -> None:
        pass

    def phase_advanced(self, name: str, completed: int, total: int | None) -> None:
        pass

    def phase_ended(self, name: str, seconds: float) -> None:
        pass


class Phase:
    """The handle `StepPhases.phase` yields: `total` (settable) and `advance(n)`."""

    def __init__(self, owner: StepPhases, name: str, total: int | None) -> None:
        self._owner, self.name, self._total, self.completed = owner, name, total, 0

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int | None) -> None:
        self._total = value
        self._owner.notify("phase_advanced", self.name, self.completed, value)

    def advance(self, n: int = 1) -> None:
        self.completed += n
        self._owner.notify("phase_advanced", self.name, self.completed, self._total)


class StepPhases:
    """Times named phases into `seconds` and forwards their progress to `listeners` (see the module docstring)."""

    def __init__(self, listeners: list | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.listeners: list = list(listeners or [])

    def reset(self) -> None:
        """Forget the previous step's times (listeners stay)."""
        self.seconds = {}

    @contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Phase]:
        handle = Phase(self, name, total)
        self.notify("phase_started", name, total)
        start = time.perf_counter()
        try:
            yield handle
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            self.notify("phase_ended", name, elapsed)

    def notify(self, event: str, *args) -> None:
        for listener in self.listeners:
            method = getattr(listener, event, None)  # the contract lets a listener implement any subset
            if method is not None:
                method(*args)

    def metrics(self, prefix: str = "time/") -> dict[str, float]:
        """`{prefix}{name}_s` for every phase timed since the last `reset` (the slowest rank's, over ranks)."""
        return {f"{prefix}{name}_s": Max(seconds) for name, seconds in self.seconds.items()}
