from qed_lightning.modules.base import QEDModule
from qed_lightning.modules.sft import SFTModule

__all__ = ["QEDModule", "SFTModule"]
