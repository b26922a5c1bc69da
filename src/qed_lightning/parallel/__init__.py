"""Scale-out: our Lightning strategies (`FSDP2Strategy`, `DeepSpeedStrategy`, FSDP1 refused) and the one home of
the distributed helpers (rank and world size, gathers, full-parameter iteration, "is this DeepSpeed / ZeRO-3?").

Configs name the strategies as `qed_lightning.parallel.FSDP2Strategy` / `qed_lightning.parallel.DeepSpeedStrategy`.
"""

from qed_lightning.parallel.strategies import (
    DeepSpeedStrategy,
    FSDP2Strategy,
    ProcessRanks,
    apply_fsdp2,
    decoder_layers,
    is_fully_sharded,
    process_ranks,
    refuse_unsupported_strategy,
)

__all__ = ["DeepSpeedStrategy", "FSDP2Strategy", "ProcessRanks", "apply_fsdp2", "decoder_layers", "is_fully_sharded",
           "process_ranks", "refuse_unsupported_strategy"]
