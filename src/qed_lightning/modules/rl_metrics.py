"""Per-step RL metrics: rewards, groups without signal, lengths, truncation, score histogram, policy lag.

Under data parallelism every rank generates and grades its own prompts, so a metric computed from one rank's
rollouts describes only its share. `rollout_table` turns a rank's rollouts into a `[N, 6]` tensor; the module
gathers the ranks' tables and computes the `rollout/*` and `judge/score_*` metrics of the whole step from them
(`table_metrics`). The other metrics combine as the code that made them declares (`qed_lightning.reductions`: `Sum`
counts add up, `Max` maxima and phase times take the slowest rank, plain floats are averaged over ranks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qed_lightning.parallel.distributed import gather_objects
from qed_lightning.reductions import combine
from qed_lightning.rl import zero_advantage_fraction
from qed_lightning.rollout.base import Completion

#: columns of `rollout_table`
COLUMNS = ("reward", "valid", "length", "truncated", "policy_version", "score")


def rollout_table(rollouts: Sequence[Completion], rewards: torch.Tensor, valid: torch.Tensor,
                  grades: Sequence | None = None) -> torch.Tensor:
    """One row per rollout, `COLUMNS` in order (score -1 = no score: a failed or missing grade), float64."""
    scores = [(-1 if g.score is None else g.score) for g in grades] if grades is not None else [-1] * len(rollouts)
    return torch.tensor(
        [[float(rewards[i]), float(valid[i]), len(r.completion_ids), float(r.truncated), r.policy_version, scores[i]]
         for i, r in enumerate(rollouts)], dtype=torch.float64).reshape(len(rollouts), len(COLUMNS))


def table_metrics(table: torch.Tensor, group_size: int, step: int) -> dict[str, float]:
    """`rollout/*` metrics (rewards over valid samples only) and the `judge/score_k` histogram of a step's table."""
    rewards, valid, lengths, truncated, versions, scores = table.T
    valid = valid.bool()
    kept = rewards[valid]
    graded = scores[scores >= 0]
    total = max(graded.numel(), 1)
    metrics = {
        "rollout/reward_mean": float(kept.mean()) if kept.numel() else 0.0,
        "rollout/reward_std": float(kept.std()) if kept.numel() > 1 else 0.0,
        "rollout/zero_adv_group_frac": zero_advantage_fraction(rewards, group_size, valid=valid),
        "rollout/response_len_mean": float(lengths.mean()),
        "rollout/response_len_max": float(lengths.max()),
        "rollout/truncated_frac": float(truncated.mean()),
        "rollout/dropped_frac": float((~valid).double().mean()),
        "rollout/policy_lag_max": float(step - versions.min()),
        "rollout/sequences": float(table.shape[0]),  # the step's sequences over every rank (the table is gathered)
    }
    metrics.update({f"judge/score_{k}": float((graded == k).sum()) / total for k in range(8)})
    return metrics


def reduce_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Combine every rank's metrics as each declares (`qed_lightning.reductions`: `Sum` counts, `Max` maxima and
    times, plain floats averaged; a key only some ranks have combines over those ranks)."""
    return combine(gather_objects(metrics))
