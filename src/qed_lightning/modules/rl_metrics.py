"""Per-step RL metrics: rewards, groups without signal, lengths, truncation, score histogram, policy lag."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qed_lightning.rl import zero_advantage_fraction
from qed_lightning.rollout.base import Completion


def rollout_metrics(rollouts: Sequence[Completion], rewards: torch.Tensor, valid: torch.Tensor, group_size: int, step: int) -> dict[str, float]:
    """`rollout/*` metrics of one step (rewards over valid samples only)."""
    kept = rewards[valid]
    lengths = torch.tensor([len(r.completion_ids) for r in rollouts], dtype=torch.float32)
    return {
        "rollout/reward_mean": float(kept.mean()) if kept.numel() else 0.0,
        "rollout/reward_std": float(kept.std()) if kept.numel() > 1 else 0.0,
        "rollout/zero_adv_group_frac": zero_advantage_fraction(rewards, group_size, valid=valid),
        "rollout/response_len_mean": float(lengths.mean()),
        "rollout/response_len_max": float(lengths.max()),
        "rollout/truncated_frac": sum(r.truncated for r in rollouts) / len(rollouts),
        "rollout/dropped_frac": float((~valid).float().mean()),
        "rollout/policy_lag_max": float(max(step - r.policy_version for r in rollouts)),
    }


def score_histogram(grades: Sequence) -> dict[str, float]:
    """Fraction of this step's grades at each score 0..7 (`judge/score_k`); failures are not scores."""
    scores = [g.score for g in grades if g.score is not None]
    total = max(len(scores), 1)
    return {f"judge/score_{k}": sum(s == k for s in scores) / total for k in range(8)}
