"""The progress bar of every config: optimizer steps, and inside an RL step, the phase it is in.

A paper-scale RL step (1,024 rollouts of up to 49k tokens, then 1,024 judge calls, then the micro-batches) runs for an
hour; counting optimizer steps alone shows nothing moving. `QEDProgressBar` (Lightning's `RichProgressBar`, same
arguments) listens to the module's phases (`qed_lightning.metrics.StepPhases`, the one mechanism that times a
step's phases) and shows the current one under the step bar:

    generate  37/64 rollouts · 1,234 tok/s
    grade     12/64 grades · 1 failed
    train     3/8 micro-batches
    sync      weights to the engine

In a terminal it is a second live bar; where the output is not a terminal (a log file, CI, SLURM), it writes one line
per phase when the phase ends (`[step 3] generate: 64/64 rollouts in 12.3 s, 1,234 tok/s`), never a line per update.
Generation advances as rollouts finish (vLLM reports finished requests), so rollouts of equal length finish together.
Besides the three phase events, the bar accepts `phase_stats(name, stats)`: `{"tokens": n}` (generated tokens so far)
and `{"failed": n}` (judge failures so far), which the RL module forwards from the engine and the judge.

In log mode it also writes one line per optimizer step with the step's main metrics, as TRL and verl print them
(`step_line`; the first line below is wrapped here), and one line per validation pass:

    [step 3] reward 0.41 ± 0.12 · loss -0.031 · grad_norm 0.82 · len 24.0 · trunc 1.00 · lr 3.0e-03 · judge_fail 0
        · 0.4 s
    [step 4] validation: val/reward_mean 0.38 in 0.9 s

The bar shows no `v_num` (the run folder is printed at the end of `qed-fit`), and an RL run's bar is labelled
"RL steps" rather than "Epoch N" (an RL run's epochs are passes over the prompt set, which say nothing).

It also fixes Lightning's label for step-bounded runs: a run bounded by `max_steps` alone has `max_epochs = -1`, so
Lightning's "Epoch {e}/{max_epochs - 1}" read "Epoch 1/-2"; the bound is dropped then.
"""

from __future__ import annotations

import logging
import time

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from typing_extensions import override

__all__ = ["QEDProgressBar", "phase_line", "step_line"]

log = logging.getLogger(__name__)

#: what a phase's units are called, and its label
UNITS = {"generate": "rollouts", "grade": "grades", "train": "micro-batches", "sync": "weight pushes"}


def phase_line(name: str, completed: int, total: int | None, seconds: float | None, stats: dict[str, float]) -> str:
    """The text of a phase: what is done of how much, and its rates and failures.

    >>> phase_line("generate", 37, 64, 2.0, {"tokens": 2468})
    'generate 37/64 rollouts · 1,234 tok/s'
    >>> phase_line("grade", 64, 64, 3.0, {"failed": 1})
    'grade 64/64 grades · 1 failed'
    >>> phase_line("train", 0, None, None, {})
    'train'
    """
    units = UNITS.get(name, "")
    done = f" {completed}/{total} {units}" if total else (f" {completed} {units}" if completed else "")
    parts = [f"{name}{done}"]
    if stats.get("tokens") and seconds:
        parts.append(f"{stats['tokens'] / seconds:,.0f} tok/s")
    if stats.get("failed"):
        parts.append(f"{stats['failed']:.0f} failed")
    return " · ".join(parts)


#: the step line's fields: (label, metric keys tried in order, format)
STEP_FIELDS = (
    ("loss", ("train/loss", "train_loss", "loss"), "{:.4g}"),
    ("grad_norm", ("train/grad_norm",), "{:.3g}"),
    ("len", ("rollout/response_len_mean",), "{:.1f}"),
    ("trunc", ("rollout/truncated_frac",), "{:.2f}"),
)


def step_line(step: int, metrics: dict[str, float], lr: float | None, seconds: float) -> str:
    """One optimizer step's main metrics on one line (log mode); fields a stage does not log are left out.

    >>> print(step_line(3, {"rollout/reward_mean": 0.41, "rollout/reward_std": 0.12, "train/loss": -0.0312,
    ...               "train/grad_norm": 0.824, "rollout/response_len_mean": 24.0, "rollout/truncated_frac": 1.0,
    ...               "judge/error": 1.0, "judge/parse_fail": 0.0}, 3e-3, 0.42))  # doctest: +NORMALIZE_WHITESPACE
    [step 3] reward 0.41 ± 0.12 · loss -0.0312 · grad_norm 0.824 · len 24.0 · trunc 1.00 · lr 3.0e-03
    · judge_fail 1 · 0.4 s
    >>> step_line(7, {"train/loss": 2.5}, None, 1.25)
    '[step 7] loss 2.5 · 1.2 s'
    """
    from qed_lightning.rewards.judge import FAILED

    parts = []
    if "rollout/reward_mean" in metrics:
        std = metrics.get("rollout/reward_std")
        parts.append(f"reward {metrics['rollout/reward_mean']:.2f}" + (f" ± {std:.2f}" if std is not None else ""))
    for label, keys, fmt in STEP_FIELDS:
        key = next((k for k in keys if k in metrics), None)
        if key is not None:
            parts.append(f"{label} {fmt.format(float(metrics[key]))}")
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    failures = [metrics[f"judge/{name}"] for name in FAILED if f"judge/{name}" in metrics]
    if failures:
        parts.append(f"judge_fail {sum(failures):.0f}")
    parts.append(f"{seconds:.1f} s")
    return f"[step {step}] " + " · ".join(parts)


class QEDProgressBar(RichProgressBar):
    """`RichProgressBar` (same arguments) that also shows the RL step's phase; see the module docstring."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._phase_task = None
        self._phase: dict = {}
        self._step_start = 0.0
        self._val_start = 0.0

    def _get_train_description(self, current_epoch: int) -> str:
        if self._trainer is not None and getattr(self._trainer.lightning_module, "phases", None) is not None:
            return "RL steps"  # an RL module (it has step phases): epochs are passes over the prompts, not progress
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            description = description.replace(f"/{max_epochs - 1}", "", 1)
        return description

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        from qed_lightning.modules.rubric_rl import RubricRLModule

        phases = pl_module.phases if isinstance(pl_module, RubricRLModule) else None  # SFT has no phases
        if trainer.is_global_zero and phases is not None and self not in phases.listeners:
            phases.listeners.append(self)

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the run's folder is printed at the end of qed-fit
        return metrics

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._step_start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.interactive or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        optimizers = trainer.optimizers
        lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else None
        log.info(step_line(trainer.global_step, metrics, lr, time.perf_counter() - self._step_start))

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._val_start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.interactive or not trainer.is_global_zero or trainer.sanity_checking:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith("val/") and ("reward_mean" in k or k.endswith("loss"))
                 and getattr(v, "numel", lambda: 1)() == 1}
        values = ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items()))
        log.info("[step %d] validation: %s%.1f s", trainer.global_step, f"{values} in " if values else "",
                 time.perf_counter() - self._val_start)

    @property
    def interactive(self) -> bool:
        return self.progress is not None and self._console is not None and self._console.is_terminal

    # -- the phase listener ------------------------------------------------------------------------------------

    def phase_started(self, name: str, total: int | None) -> None:
        step = self._trainer.global_step if self._trainer is not None else 0  # the step's number before it steps
        self._phase = {"name": name, "completed": 0, "total": total, "start": time.perf_counter(), "stats": {},
                       "step": step}
        if self.interactive:
            self._phase_task = self.progress.add_task(self._text(), total=total or float("inf"))

    def phase_advanced(self, name: str, completed: int, total: int | None) -> None:
        if self._phase.get("name") == name:
            self._phase.update(completed=completed, total=total)
            self._refresh_phase()

    def phase_stats(self, name: str, stats: dict[str, float]) -> None:
        if self._phase.get("name") == name:
            self._phase["stats"].update(stats)
            self._refresh_phase()

    def phase_ended(self, name: str, seconds: float) -> None:
        if self._phase.get("name") != name:
            return
        if self._phase_task is not None and self.progress is not None:
            self.progress.remove_task(self._phase_task)
            self._phase_task = None
        if not self.interactive:  # a log file: one line per phase, when it ends
            p = self._phase
            what = f"{p['completed']}/{p['total']} {UNITS.get(name, '')} in " if p["total"] else ""
            extras = phase_line(name, 0, None, seconds, p["stats"]).partition(" · ")[2]
            log.info("[step %d] %s: %s%.1f s%s", p["step"], name, what, seconds, f", {extras}" if extras else "")
        self._phase = {}

    def _text(self) -> str:
        """The live bar's description: the phase and its units (the bar's own column shows k/N), then its rates."""
        p = self._phase
        extras = phase_line(p["name"], 0, None, time.perf_counter() - p["start"], p["stats"]).partition(" · ")[2]
        return " · ".join(x for x in (f"{p['name']} {UNITS.get(p['name'], '')}".strip(), extras) if x)

    def _refresh_phase(self) -> None:
        if self._phase_task is not None and self.progress is not None:
            total = self._phase["total"]
            self.progress.update(self._phase_task, completed=self._phase["completed"], total=total or float("inf"),
                                 description=self._text())
            self.refresh()
