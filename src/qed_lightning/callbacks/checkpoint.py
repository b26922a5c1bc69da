"""Atomic checkpoints: a checkpoint on disk is either complete or ignored.

Lightning writes a checkpoint straight to its final name, so a run killed mid-write (SIGKILL, node failure) can leave
a truncated `last.ckpt` that the next `--ckpt_path last` then fails to load. We write to `<name>.partial` and rename
it into place once complete (`os.replace` is atomic on POSIX file systems, for files and for the directories that
sharded strategies write). A leftover `.partial` never matches the `*.ckpt` names Lightning resumes from.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


def save_checkpoint_atomic(trainer: L.Trainer, filepath: str | Path, weights_only: bool = False) -> None:
    """`trainer.save_checkpoint` through a temporary name, renamed into place by rank 0 when every rank is done."""
    final = Path(filepath)
    partial = final.with_name(final.name + ".partial")
    if trainer.is_global_zero and partial.exists():
        shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
    trainer.strategy.barrier("qed_atomic_checkpoint_clean")
    trainer.save_checkpoint(str(partial), weights_only)
    trainer.strategy.barrier("qed_atomic_checkpoint_written")
    if trainer.is_global_zero:
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(partial, final)
    trainer.strategy.barrier("qed_atomic_checkpoint_renamed")


class AtomicModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose every save (periodic, top-k and `last`) is atomic. Same arguments, except that
    `enable_version_counter` defaults to False: a run's folder holds one run (`qed_lightning.runfolder`), so a name
    that exists is this run's older copy and is replaced (`last.ckpt` stays the newest, never `last-v1.ckpt` beside
    a stale `last.ckpt`)."""

    def __init__(self, *args, enable_version_counter: bool = False, **kwargs) -> None:
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """`last.ckpt` is the run's final state when it ends (Lightning saves only every `every_n_train_steps`), so a
        finished run resumed with a larger `max_steps` continues where it stopped rather than redoing steps."""
        preempted = any(getattr(cb, "preempted", False) for cb in trainer.callbacks)  # it saved its own checkpoint
        if self.save_last and not preempted and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        save_checkpoint_atomic(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
