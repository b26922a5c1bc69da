"""Small single-purpose callbacks: atomic checkpoints, pre-emption handling, the progress bar, rollout tables for
experiment trackers, the config logged as hyperparameters, and the judge audit (a second judge against reward
hacking)."""

from qed_lightning.callbacks.audit import JudgeAudit
from qed_lightning.callbacks.checkpoint import AtomicModelCheckpoint, save_checkpoint_atomic
from qed_lightning.callbacks.hparams import LogConfigCallback
from qed_lightning.callbacks.preemption import PreemptionCheckpoint
from qed_lightning.callbacks.progress import QEDProgressBar
from qed_lightning.callbacks.rollout_table import RolloutTable

__all__ = ["AtomicModelCheckpoint", "JudgeAudit", "LogConfigCallback", "PreemptionCheckpoint", "QEDProgressBar",
           "RolloutTable", "save_checkpoint_atomic"]
