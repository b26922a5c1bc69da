from qed_lightning.data.loading import DataError, load_rows
from qed_lightning.data.rl import ProofProblem, ProofRLDataModule
from qed_lightning.data.sft import SFTDataModule

__all__ = ["DataError", "ProofProblem", "ProofRLDataModule", "SFTDataModule", "load_rows"]
