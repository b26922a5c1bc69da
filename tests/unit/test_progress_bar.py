"""Every config's progress bar: no "Epoch 0/-2" on step-bounded runs (Lightning sets max_epochs to -1 when a fit is
bounded by max_steps alone), Lightning's own label otherwise (real fits of Lightning's BoringModel); and the phase of
an RL step, one line per phase where the output is not a terminal (a real RL run: test_report_browser.py)."""

import re

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from qed_lightning.callbacks import QEDProgressBar


class _Recording(QEDProgressBar):
    labels: list[str] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _Recording.labels.append(self._get_train_description(trainer.current_epoch).strip())
        super().on_train_epoch_end(trainer, pl_module)


def _label(tmp_path, **limits) -> str:
    _Recording.labels = []
    trainer = L.Trainer(callbacks=[_Recording()], logger=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_train_batches=2, limit_val_batches=0, **limits)
    trainer.fit(BoringModel())
    return _Recording.labels[0]


def test_step_bounded_run_has_no_negative_epoch_bound(tmp_path):
    assert _label(tmp_path, max_steps=2) == "Epoch 0"


def test_epoch_bounded_run_keeps_lightnings_label(tmp_path):
    assert _label(tmp_path, max_epochs=3) == "Epoch 0/2"


# -- the phase of an RL step ---------------------------------------------------------------------------------------

import doctest  # noqa: E402
import logging  # noqa: E402

import qed_lightning.callbacks.progress as progress_module  # noqa: E402
from qed_lightning.metrics import StepPhases  # noqa: E402


def test_phase_lines_doctests():
    assert doctest.testmod(progress_module).failed == 0


def test_without_a_terminal_each_phase_is_one_line_when_it_ends(caplog):
    """Driven through the module's own StepPhases, as the RL step drives it: no line per update, one per phase, with
    its count, time, tokens/s (from phase_stats) and failures."""
    bar, phases = QEDProgressBar(), StepPhases()
    phases.listeners.append(bar)  # what on_train_start does for an RL module
    with caplog.at_level(logging.INFO, logger="qed_lightning.callbacks.progress"):
        with phases.phase("generate", total=8) as ph:
            for done in (3, 8):
                phases.notify("phase_stats", "generate", {"tokens": 40 * done})
                ph.advance(done - ph.completed)
        with phases.phase("grade", total=8) as ph:
            phases.notify("phase_stats", "grade", {"failed": 2})
            ph.advance(8)
        with phases.phase("train") as ph:
            ph.total = 3
            ph.advance(3)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert re.fullmatch(r"\[step 0\] generate: 8/8 rollouts in [0-9.]+ s, [0-9,]+ tok/s", lines[0])
    assert re.fullmatch(r"\[step 0\] grade: 8/8 grades in [0-9.]+ s, 2 failed", lines[1])
    assert re.fullmatch(r"\[step 0\] train: 3/3 micro-batches in [0-9.]+ s", lines[2])
