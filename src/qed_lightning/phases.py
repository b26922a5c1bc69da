"""Named phases of a training step: the one mechanism that times them and tells listeners about them.

A module owns one `StepPhases` (`self.phases`), reset at the start of every training step. Each named step of the
step runs inside `with self.phases.phase(name) as ph:`; the block's wall time adds up into `seconds[name]` (a name
that repeats within a step is summed), which is where the step's `time/{name}_s` metrics come from. A phase with a
known amount of work says so (`total=`, or `ph.total = ...` once known) and calls `ph.advance()` as it goes, so a
progress display can follow it: every listener in `listeners` is called with

    phase_started(name, total)          when the block is entered
    phase_advanced(name, completed, total)  on every `advance` (and when `total` is set)
    phase_ended(name, seconds)          when the block is left, normally or by an exception

A listener may implement any subset of the three (`PhaseListener` documents them, with no-op defaults).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


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
        from qed_lightning.reductions import Max

        return {f"{prefix}{name}_s": Max(seconds) for name, seconds in self.seconds.items()}
