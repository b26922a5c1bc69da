"""What an RL step shows while it runs and keeps when it is done: progress of its phases, and its rollout records.

`report_progress` forwards the rollout engine's finished completions and the judge's finished grades into the current
phase (`phases.py`: "generate k/N", "grade k/N"), and the tokens generated and grades failed so far to the
phase listeners as `phase_stats(name, stats)` (what `QEDProgressBar` shows as tok/s and failures). `keep_rollouts`
turns a step into rollout records (`report/records.py`), gathers every rank's to rank 0 and writes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch

from qed_lightning.parallel.distributed import gather_objects
from qed_lightning.phases import Phase, StepPhases
from qed_lightning.report.records import RolloutLog, rollout_records
from qed_lightning.rewards import BaseJudge, Grade
from qed_lightning.rollout.base import RolloutEngine

__all__ = ["keep_rollouts", "report_progress"]

FAILED = ("error", "parse_fail", "incomplete")


@contextmanager
def report_progress(phases: StepPhases, phase: Phase, engine: RolloutEngine, judge: BaseJudge) -> Iterator[None]:
    """While the block runs, the engine's and the judge's progress advances `phase` (see the module docstring)."""
    stats = {"tokens": 0, "failed": 0}

    def generated(done: int, tokens: int) -> None:
        stats["tokens"] += tokens
        phases.notify("phase_stats", phase.name, {"tokens": stats["tokens"]})
        phase.advance(done)

    def graded(grade: Grade) -> None:
        stats["failed"] += grade.status in FAILED
        phases.notify("phase_stats", phase.name, {"failed": stats["failed"]})
        phase.advance()

    engine.progress, judge.progress = generated, graded
    try:
        yield
    finally:
        engine.progress = judge.progress = None


def keep_rollouts(module: L.LightningModule, keep: RolloutLog, batch: list, rollouts: list, grades: list,
                  rewards: torch.Tensor, valid: torch.Tensor, advantages: torch.Tensor, version: int) -> list[dict]:
    """The step's kept records (`keep`: all, a seeded sample or none), every rank's, in rank order; rank 0 writes
    them atomically to `<default_root_dir>/rollouts/step_{version:06d}.jsonl`."""
    if not keep.enabled:
        return []
    records = rollout_records(batch, rollouts, grades, rewards, valid, advantages, version,
                              module.tokenizer.decode, module.judge.proof_of)
    trainer = module._trainer  # None for a module stepped outside a Trainer: the records stay in memory
    mine = keep.select(records, version, module.global_rank, trainer.world_size if trainer is not None else 1)
    kept = [r for part in gather_objects(mine) for r in part]
    if trainer is not None and trainer.is_global_zero:
        keep.write(trainer.default_root_dir, version, kept)
    return kept
