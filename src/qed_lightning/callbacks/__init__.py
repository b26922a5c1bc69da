"""Small single-purpose callbacks: atomic checkpoints, pre-emption handling, the progress bar."""

from qed_lightning.callbacks.checkpoint import AtomicModelCheckpoint, save_checkpoint_atomic
from qed_lightning.callbacks.preemption import PreemptionCheckpoint
from qed_lightning.callbacks.progress import QEDProgressBar

__all__ = ["AtomicModelCheckpoint", "PreemptionCheckpoint", "QEDProgressBar", "save_checkpoint_atomic"]
