from qed_lightning.data.loading import DataError, load_rows
from qed_lightning.data.sft import SFTDataModule

__all__ = ["DataError", "SFTDataModule", "load_rows"]
