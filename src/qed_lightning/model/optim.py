"""Learning-rate schedules that a YAML can name by `class_path` (the optimizer is injected by `qed-fit`).

A schedule's length is the run's length: `WarmupCosineLR(total_steps=None)` (the default, and what the shipped
configs use) takes the trainer's `max_steps` when the module builds it (`QEDModule.configure_optimizers`), so
`--trainer.max_steps` on the command line reaches the schedule. The configs used to write
`total_steps: ${trainer.max_steps}`, which omegaconf resolves from the YAML before the command line is applied: a
longer run then trained at the final LR (0 with `min_ratio: 0`) after the YAML's step count. On resume, a schedule
that follows the trainer keeps the current run's `max_steps` rather than the one saved in the checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from qed_lightning.data.loading import ConfigError


class WarmupCosineLR(LambdaLR):
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_ratio` x base LR at `total_steps`.

    `total_steps=None` follows the trainer's `max_steps` (see the module docstring); `total_steps=0` keeps the LR
    constant after warm-up (the paper's RL stages use a constant 1e-6).

    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> s = WarmupCosineLR(opt, warmup_steps=2, total_steps=4, min_ratio=0.0)
    >>> [round(s.lr_lambda(i), 3) for i in range(5)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    >>> s = WarmupCosineLR(opt, warmup_steps=2)
    >>> s.follow_run(8).total_steps, round(s.lr_lambda(5), 3)
    (8, 0.5)
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                 min_ratio: float = 0.0) -> None:
        if warmup_steps < 0 or (total_steps is not None and total_steps < 0):
            raise ValueError(f"lr_scheduler.init_args.warmup_steps and total_steps must be >= 0, got {warmup_steps}, "
                             f"{total_steps}")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        self.follows_run = total_steps is None
        super().__init__(optimizer, self.lr_lambda)

    def follow_run(self, max_steps: int) -> WarmupCosineLR:
        """Take the run's length when `total_steps` was left to it (None); a value set in the config is kept."""
        if self.follows_run:
            if max_steps is None or max_steps < 1:
                raise ConfigError(f"lr_scheduler.init_args.total_steps is unset, so the schedule follows "
                                 f"trainer.max_steps, which is {max_steps}: set trainer.max_steps or total_steps")
            self.total_steps = max_steps
        return self

    def lr_lambda(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None or self.total_steps <= self.warmup_steps:
            return 1.0  # None: not yet told the run's length (only while LambdaLR initialises)
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position; a schedule that follows the run keeps this run's length, not the checkpoint's."""
        total, follows = self.total_steps, self.follows_run
        super().load_state_dict(state_dict)
        if follows:
            self.total_steps, self.follows_run = total, follows
