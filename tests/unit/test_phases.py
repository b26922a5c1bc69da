"""StepPhases: the one phase mechanism (timing into `seconds`, progress to listeners)."""

import pytest

from qed_lightning.metrics import PhaseListener, StepPhases


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def phase_started(self, name, total):
        self.events.append(("started", name, total))

    def phase_advanced(self, name, completed, total):
        self.events.append(("advanced", name, completed, total))

    def phase_ended(self, name, seconds):
        self.events.append(("ended", name, seconds >= 0))


class OnlyEnds:  # a listener may implement any subset of the three methods
    def __init__(self) -> None:
        self.ended: list[str] = []

    def phase_ended(self, name, seconds):
        self.ended.append(name)


def test_listeners_see_start_progress_and_end_in_order():
    rec, ends = Recorder(), OnlyEnds()
    phases = StepPhases([rec, ends, PhaseListener()])
    with phases.phase("generate"):
        pass
    with phases.phase("train") as ph:
        ph.total = 3
        ph.advance()
        ph.advance(2)
    assert rec.events == [
        ("started", "generate", None), ("ended", "generate", True),
        ("started", "train", None), ("advanced", "train", 0, 3), ("advanced", "train", 1, 3),
        ("advanced", "train", 3, 3), ("ended", "train", True),
    ]
    assert ends.ended == ["generate", "train"]
    assert set(phases.metrics()) == {"time/generate_s", "time/train_s"}


def test_a_repeated_name_adds_up_and_reset_forgets(monkeypatch):
    clock = iter([10.0, 10.5, 20.0, 21.25, 30.0, 30.1])  # enter/leave times of the three blocks below
    monkeypatch.setattr("qed_lightning.metrics.time.perf_counter", lambda: next(clock))
    phases = StepPhases()
    with phases.phase("grade", total=4) as ph:
        assert ph.total == 4
    with phases.phase("grade"):
        pass
    assert phases.seconds == {"grade": pytest.approx(0.5 + 1.25)}
    phases.reset()
    with phases.phase("train"):
        pass
    assert phases.seconds == {"train": pytest.approx(0.1)}


def test_a_failing_block_is_still_timed_and_ended():
    rec = Recorder()
    phases = StepPhases([rec])
    with pytest.raises(RuntimeError, match="boom"):
        with phases.phase("train"):
            raise RuntimeError("boom")
    assert "train" in phases.seconds and rec.events[-1] == ("ended", "train", True)
