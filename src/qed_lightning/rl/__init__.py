"""The RL math of qed-lightning as pure tensor functions: advantages, policy loss, log-probs (SPEC section 4).

Nothing here knows about models, trainers or devices; the Lightning modules call these functions in order:
`token_logprobs` (and `entropy_from_logits`) -> `group_advantages` -> `policy_loss`.
"""

from qed_lightning.rl.advantages import (
    AdvantageScale,
    flat_groups,
    group_advantages,
    group_advantages_masked,
    zero_advantage_fraction,
)
from qed_lightning.rl.losses import entropy_from_logits, shift_for_causal_lm, token_logprobs
from qed_lightning.rl.losses import AGGREGATIONS, Aggregation, k3_kl, policy_loss
from qed_lightning.rl.overlong import soft_overlong_penalty

__all__ = [
    "AGGREGATIONS",
    "AdvantageScale",
    "Aggregation",
    "entropy_from_logits",
    "flat_groups",
    "group_advantages",
    "group_advantages_masked",
    "k3_kl",
    "policy_loss",
    "shift_for_causal_lm",
    "soft_overlong_penalty",
    "token_logprobs",
    "zero_advantage_fraction",
]
