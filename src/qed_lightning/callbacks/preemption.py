"""Pre-emption: on SIGUSR1/SIGTERM, checkpoint at the next step boundary, stop, and requeue the SLURM job.

SLURM warns a job before killing it (`#SBATCH --signal=USR1@180`: SIGUSR1 to every task 180 s before the time
limit; pre-emption sends SIGTERM, then SIGKILL after the partition's grace time). The handler only sets a flag: a
checkpoint written from inside a signal handler could interrupt an optimizer step half way. At the end of the next
training batch all ranks agree on the flag (any rank signalled = all stop), write `last.ckpt` atomically
(`save_checkpoint_atomic`, so a kill during the write leaves the previous one usable), stop the trainer (skipping
the HF export of these intermediate weights), and rank 0 runs `scontrol requeue $SLURM_JOB_ID`. The requeued job
resumes with `--ckpt_path last`, which starts fresh (with a warning) when no checkpoint exists yet.

Lightning's own SLURM auto-requeue must be off in this mode (`SLURMEnvironment(auto_requeue=False)`, see
scripts/slurm/train.sbatch): it would save a second checkpoint (`hpc_ckpt_*.ckpt`) from inside its signal handler
and requeue the job a second time.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from qed_lightning.callbacks.checkpoint import save_checkpoint_atomic

log = logging.getLogger(__name__)


def slurm_job_id(env: dict[str, str] | None = None) -> str | None:
    """The id `scontrol requeue` takes: `ARRAYJOB_TASK` for array jobs, else `SLURM_JOB_ID`; None outside SLURM.

    >>> slurm_job_id({"SLURM_JOB_ID": "42"}), slurm_job_id({"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3"})
    ('42', '7_3')
    """
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


class PreemptionCheckpoint(Callback):
    """Save `last.ckpt` and stop at the step boundary after a pre-emption signal; requeue inside SLURM.

    Args:
        dirpath: where `last.ckpt` goes; None = the ModelCheckpoint's folder (so `--ckpt_path last` finds it), else
            `<default_root_dir>/checkpoints`.
        signals: signal names that request the checkpoint.
        requeue: run `scontrol requeue` (rank 0, only when SLURM_JOB_ID is set).
    """

    def __init__(self, dirpath: str | None = None, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"),
                 requeue: bool = True) -> None:
        unknown = [s for s in signals if not hasattr(signal, s)]
        if unknown:
            raise ValueError(f"PreemptionCheckpoint: unknown signal names {unknown}; use e.g. SIGUSR1, SIGTERM")
        self.dirpath = dirpath
        self.signals = tuple(signals)
        self.requeue = requeue
        self.signalled: str | None = None
        self.preempted = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.signalled = signal.Signals(signum).name

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionCheckpoint: not in the main thread, no signal handlers installed")
            return
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        folder = (self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
                  or Path(trainer.default_root_dir) / "checkpoints")
        return Path(folder) / "last.ckpt"

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.preempted or not trainer.strategy.reduce_boolean_decision(self.signalled is not None, all=False):
            return
        path = self.checkpoint_path(trainer)
        rank_zero_info(f"pre-emption signal ({self.signalled or 'on another rank'}): saving {path} at step "
                       f"{trainer.global_step} and stopping")
        save_checkpoint_atomic(trainer, path)
        self.preempted = True
        trainer.should_stop = True
        job = slurm_job_id()
        if self.requeue and job and trainer.is_global_zero:
            self._requeue(job)

    @staticmethod
    def _requeue(job: str) -> None:
        if not re.fullmatch(r"[0-9_]+", job):
            log.warning("not requeueing: unexpected SLURM job id %r", job)
            return
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (FileNotFoundError, subprocess.TimeoutExpired) as err:
            log.warning("scontrol requeue %s failed: %s", job, err)
            return
        if result.returncode == 0:
            rank_zero_info(f"requeued SLURM job {job}")
        else:
            log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
