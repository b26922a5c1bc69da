from qed_lightning.modules.base import QEDModule
from qed_lightning.modules.rubric_rl import RubricRLModule
from qed_lightning.modules.sft import SFTModule

__all__ = ["QEDModule", "RubricRLModule", "SFTModule"]
