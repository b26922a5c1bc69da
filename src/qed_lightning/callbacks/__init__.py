"""Small single-purpose callbacks: atomic checkpoints (and, in sibling modules, pre-emption handling)."""

from qed_lightning.callbacks.checkpoint import AtomicModelCheckpoint, save_checkpoint_atomic
from qed_lightning.callbacks.preemption import PreemptionCheckpoint

__all__ = ["AtomicModelCheckpoint", "PreemptionCheckpoint", "save_checkpoint_atomic"]
