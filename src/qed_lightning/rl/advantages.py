"""Group-relative advantages for GRPO-style RL (SPEC section 4).

A step samples G completions for each of P prompts; the rewards arrive as one flat vector `[P * G]` in which a
prompt's G completions are adjacent. The advantage of a completion is its reward relative to its own group.

Paper's choice (reference implementation): **mean baseline, no std scaling**: `A_i = r_i - mean_j r_j`
(`scale="none"`). Rewards are `score / 7`, so advantages already live in [-1, 1] and scaling by the std would
up-weight groups that barely disagree (a group with rewards {0, 1/7} would weigh as much as one with {0, 1}).

Alternatives offered:
- `scale="std"`: the original GRPO `(r_i - mean) / (std + eps)` with the *unbiased* std (`torch.std`'s default).
  A group of one completion has no spread: its advantage is 0, never NaN.
- `group_advantages_masked`: for `on_failure="drop"`, where a judge failure removes a sample from its group instead
  of counting it as a real 0 (the reference's behaviour, `on_failure="zero"`). The mean and std use the valid
  members only and a dropped sample gets advantage 0, so it contributes no gradient.

Groups whose rewards are all equal get all-zero advantages and carry no policy signal;
`zero_advantage_fraction` measures how much of a batch that is (a useful `rollout/` metric: when it nears 1 the
prompts are too easy or too hard for the current policy).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AdvantageScale = Literal["none", "std"]
_SCALES = ("none", "std")


def _check_groups(rewards: Tensor, group_size: int, scale: str = "none") -> None:
    problems = []
    if rewards.dim() != 1:
        problems.append(f"rewards must be 1-D [P * G], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        problems.append(f"group_size must be >= 1, got {group_size}")
    elif rewards.numel() % group_size != 0:
        problems.append(
            f"rewards has {rewards.numel()} elements, which is not a multiple of group_size={group_size}; "
            "pass all G completions of every prompt, adjacent"
        )
    if scale not in _SCALES:
        problems.append(f"scale must be one of {_SCALES}, got {scale!r}")
    if problems:
        raise ValueError("; ".join(problems))


def _check_valid(rewards: Tensor, valid: Tensor) -> None:
    if valid.shape != rewards.shape or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool tensor shaped like rewards {tuple(rewards.shape)}, "
            f"got dtype {valid.dtype} and shape {tuple(valid.shape)}"
        )


def _as_float(rewards: Tensor) -> Tensor:
    return rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())


def group_advantages(
    rewards: Tensor, group_size: int, scale: AdvantageScale = "none", eps: float = 1e-4
) -> Tensor:
    """Return `r - group mean` (`scale="none"`, paper) or `(r - mean) / (std + eps)` (`scale="std"`), `[P * G]`.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2)
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    _check_groups(rewards, group_size, scale)
    grouped = _as_float(rewards).view(-1, group_size)  # [P, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [P, G]
    if scale == "std":
        # Unbiased std; with G == 1 torch.std is NaN, and a lone completion has no spread anyway.
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)  # [P, 1]
        centred = centred / (std + eps)
    return centred.reshape(-1)  # [P * G]


def group_advantages_masked(
    rewards: Tensor,
    valid: Tensor,
    group_size: int,
    scale: AdvantageScale = "none",
    eps: float = 1e-4,
) -> Tensor:
    """Like `group_advantages`, but statistics use only `valid` members and invalid samples get advantage 0.

    `valid` is a bool `[P * G]` mask; an invalid reward may hold anything, NaN included (it is never read).
    A group with fewer than two valid members has std 0, so with `scale="std"` its advantages are 0, not NaN.
    """
    _check_groups(rewards, group_size, scale)
    _check_valid(rewards, valid)
    keep = valid.view(-1, group_size)  # [P, G]
    grouped = torch.where(keep, _as_float(rewards).view(-1, group_size), 0.0)  # [P, G]
    count = keep.sum(dim=1, keepdim=True)  # [P, 1]
    mean = grouped.sum(dim=1, keepdim=True) / count.clamp(min=1)  # [P, 1]
    centred = torch.where(keep, grouped - mean, 0.0)  # [P, G]
    if scale == "std":
        var = centred.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)  # [P, 1], unbiased
        centred = centred / (var.sqrt() + eps)
    return centred.reshape(-1)  # [P * G]


def flat_groups(rewards: Tensor, group_size: int, *, valid: Tensor | None = None) -> Tensor:
    """Bool `[P]`: True for a group whose rewards are all equal (all-zero advantages, no policy signal).

    With `valid` (as in `group_advantages_masked`), only valid members are compared; a group with at most one
    valid member is flat too.

    >>> flat_groups(torch.tensor([1.0, 1.0, 0.0, 0.5, 3.0, 0.0]), group_size=2,
    ...             valid=torch.tensor([True] * 5 + [False]))
    tensor([ True, False,  True])
    """
    _check_groups(rewards, group_size)
    if valid is not None:
        _check_valid(rewards, valid)
    grouped = _as_float(rewards).view(-1, group_size)  # [P, G]
    keep = torch.ones_like(grouped, dtype=torch.bool) if valid is None else valid.view(-1, group_size)  # [P, G]
    high = torch.where(keep, grouped, -torch.inf).amax(dim=1)  # [P]
    low = torch.where(keep, grouped, torch.inf).amin(dim=1)  # [P]
    return (high == low) | (keep.sum(dim=1) <= 1)  # [P]


def zero_advantage_fraction(rewards: Tensor, group_size: int, *, valid: Tensor | None = None) -> float:
    """Fraction of groups whose rewards are all equal (`flat_groups`), hence whose advantages are all zero.

    >>> zero_advantage_fraction(torch.tensor([1.0, 1.0, 0.0, 0.5]), group_size=2)
    0.5
    """
    if rewards.numel() == 0:
        _check_groups(rewards, group_size)
        return 0.0
    flat = flat_groups(rewards, group_size, valid=valid)  # [P]
    return flat.sum().item() / flat.numel()
