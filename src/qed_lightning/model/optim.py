"""Learning-rate schedules that a YAML can name by `class_path` (the optimizer is injected by `qed-fit`)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_ratio` x base LR at `total_steps`.

    `total_steps=0` keeps the LR constant after warm-up (the paper's RL stages use a constant 1e-6).

    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> s = WarmupCosineLR(opt, warmup_steps=2, total_steps=4, min_ratio=0.0)
    >>> [round(s.lr_lambda(i), 3) for i in range(5)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int = 0, min_ratio: float = 0.0) -> None:
        if warmup_steps < 0 or total_steps < 0:
            raise ValueError(f"warmup_steps and total_steps must be >= 0, got {warmup_steps}, {total_steps}")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self.lr_lambda)

    def lr_lambda(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
