"""The RL math of qed-lightning as pure tensor functions (SPEC section 4): the objective (`objective.py`: advantages,
policy loss), the overlong penalty, and the micro-batch layout (`microbatch.py`).

Nothing here knows about models, trainers or devices; a step computes `group_advantages`, then the model layer's
per-token log-probs (`qed_lightning.model.forward.token_logprobs`), then `policy_loss`.
"""

from qed_lightning.rl.objective import (
    AdvantageScale,
    flat_groups,
    group_advantages,
    group_advantages_masked,
    zero_advantage_fraction,
)
from qed_lightning.rl.objective import AGGREGATIONS, Aggregation, k3_kl, policy_loss
from qed_lightning.rl.overlong import soft_overlong_penalty

__all__ = [
    "AGGREGATIONS",
    "AdvantageScale",
    "Aggregation",
    "flat_groups",
    "group_advantages",
    "group_advantages_masked",
    "k3_kl",
    "policy_loss",
    "soft_overlong_penalty",
    "zero_advantage_fraction",
]
