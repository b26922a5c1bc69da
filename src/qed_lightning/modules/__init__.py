from qed_lightning.modules.base import QEDModule
from qed_lightning.modules.rc_rl import ReasoningCacheRLModule
from qed_lightning.modules.rubric_rl import RubricRLModule
from qed_lightning.modules.sft import SFTModule

__all__ = ["QEDModule", "ReasoningCacheRLModule", "RubricRLModule", "SFTModule"]
