"""Overlong handling (DAPO, Yu et al. 2025): a soft length penalty, and masking truncated samples from the loss.

A completion that hits `max_new_tokens` has no `</think>` and scores 0 without a judge call (SPEC 4), so in a group
of long proofs the truncated ones pull the baseline down and their tokens are pushed away although nothing in them
was judged wrong. DAPO offers two remedies, both off in the paper configs (the paper does neither):
- **soft overlong penalty** (`model.overlong_buffer`, `model.overlong_penalty`): with budget L_max and buffer B, a
  completion of length L gets reward r + p(L), where p(L) = 0 for L <= L_max - B, falls linearly to -penalty at
  L = L_max, and is -penalty beyond: the policy learns to stay inside the budget before it is cut;
- **overlong filtering** (`model.mask_truncated`): truncated completions keep their place in their group's baseline
  but are left out of the loss (no gradient through them).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["soft_overlong_penalty"]


def soft_overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """The DAPO length penalty `[N]` (<= 0) of completions of `lengths` `[N]` tokens under a budget of
    `max_new_tokens`, ramping over the last `buffer` tokens; all zeros when `buffer` is 0.

    Worked example (budget 10, buffer 4, penalty 1): the ramp starts after 10 - 4 = 6 tokens; L = 8 is 2 tokens
    into it, so p = (6 - 8) / 4 = -0.5; L = 10 gets -1.

    >>> soft_overlong_penalty(torch.tensor([3, 6, 7, 8, 10, 12]), max_new_tokens=10, buffer=4)
    tensor([ 0.0000,  0.0000, -0.2500, -0.5000, -1.0000, -1.0000])
    """
    if buffer < 0 or buffer > max_new_tokens or penalty < 0:
        raise ValueError(f"overlong buffer must be in [0, max_new_tokens={max_new_tokens}] and the penalty >= 0, "
                         f"got {buffer} and {penalty}")
    lengths = lengths.to(torch.get_default_dtype())
    if buffer == 0:
        return torch.zeros_like(lengths)
    start = max_new_tokens - buffer
    ramp = (start - lengths) / buffer  # [N]; 0 at the ramp's start, -1 at the budget
    return penalty * ramp.clamp(min=-1.0, max=0.0)
