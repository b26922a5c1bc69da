"""One optimizer step of a manual-optimisation module, whatever the strategy (one process, DDP, FSDP2, DeepSpeed).

`RubricRLModule` accumulates a step's gradient over micro-batches itself. What that needs beyond the loss is held by
one `ManualStep` object per module (it owns the count of consecutive non-finite steps):
- step-wide counts over all ranks (`totals`), so each rank's loss is normalised as one process would be;
- the same number of forward/backward passes on every rank (`missing_microbatches`, `idle_loss`): each pass is a
  collective under DDP/FSDP;
- under DeepSpeed, each pass announced as the engine's own forward would (`before_pass`) and the accumulation
  boundary on the last pass only: otherwise ZeRO-2 keeps only the last micro-batch's gradient (measured with
  DeepSpeed 0.19.8 on CPU: an update of norm 0.18 with 2 micro-batches and 0.15 with 4, against 0.43 with 1), and
  ZeRO-3, whose micro-step advances in `DeepSpeedEngine.forward` (which our passes bypass), overwrites each pass's
  gradient with the next (a gradient norm of 3.36 with 4 micro-batches against 6.99 with 1);
- gradient clipping and the step (`clip_and_step`), with non-finite steps skipped (counted, and
  `max_nonfinite_steps` in a row abort the run). Under DeepSpeed, ZeRO keeps gradients out of `p.grad`, so
  DeepSpeed clips (`hand_grad_clip_to_deepspeed`, from `setup`) and its global norm is the step's; a non-finite
  step there cannot be skipped from outside its buffers, only counted.
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch

from qed_lightning.parallel.distributed import deepspeed_engine, is_deepspeed

log = logging.getLogger(__name__)


class ManualStep:
    """The optimizer step of `module` (a `LightningModule` with manual optimisation); see the module docstring.

    Args:
        module: the host; read for its trainer, device, parameters, optimizers and schedulers at each call.
        grad_clip: max gradient norm (0 = no clipping, the norm is still computed and logged).
        max_nonfinite_steps: consecutive non-finite steps (each skipped) before the run aborts.
    """

    def __init__(self, module: L.LightningModule, grad_clip: float, max_nonfinite_steps: int) -> None:
        self.module = module
        self.grad_clip = grad_clip
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite = 0  #: consecutive non-finite steps so far (0 after a finite one)

    @property
    def _world(self) -> int:
        return self.module.trainer.world_size

    def totals(self, sequences: int, tokens: int, max_len: int) -> dict[str, int]:
        """The optimizer step's sequence/token counts and longest completion, over all ranks.

        Each rank normalises its token sum by the *global* counts, and its loss is multiplied by the world size
        before backward, because data-parallel strategies average gradients: the result is exactly the paper's
        `-(1/B) sum L` over the whole step, however the sequences are spread over ranks and micro-batches.
        """
        local = torch.tensor([sequences, tokens, max_len], dtype=torch.float64, device=self.module.device)
        if self._world > 1:
            gathered = self.module.all_gather(local)  # [W, 3]
            local = torch.cat([gathered[:, :2].sum(0), gathered[:, 2].max().reshape(1)])
        return {"sequences": max(int(local[0]), 1), "tokens": max(int(local[1]), 1), "max_len": max(int(local[2]), 1)}

    def missing_microbatches(self, n: int) -> int:
        """Passes this rank adds so that all ranks run as many forward/backward passes: each pass is a collective
        under DDP and FSDP, and a rank with fewer packed micro-batches would leave the others waiting forever."""
        if self._world == 1:
            return 0
        most = self.module.trainer.strategy.reduce(torch.tensor(float(n), device=self.module.device), reduce_op="max")
        return int(most) - n

    def idle_loss(self) -> torch.Tensor:
        """A zero loss through the whole model (one token): a pass's collectives, no gradient contribution."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.module.device)
        return self.module(ids, ids).sum() * 0.0

    def sum_over_ranks(self, value: float) -> float:
        if self._world == 1:
            return value
        total = torch.tensor(value, dtype=torch.float64, device=self.module.device)
        return float(self.module.trainer.strategy.reduce(total, reduce_op="sum"))

    def hand_grad_clip_to_deepspeed(self) -> None:
        """Under DeepSpeed, write `grad_clip` into its config's `gradient_clipping`; call from `setup`, which runs
        before Lightning builds the engine (and Lightning keeps a value that is already there)."""
        strategy = self.module.trainer.strategy if self.module._trainer is not None else None
        if is_deepspeed(strategy) and self.grad_clip > 0:
            strategy.config["gradient_clipping"] = self.grad_clip

    def before_pass(self, last: bool) -> None:
        """Call before each forward/backward pass of a step (`last` for the step's final one). Under DeepSpeed, do what
        `DeepSpeedEngine.forward` does first and tell ZeRO where the accumulation ends: our passes call the model
        itself, not the engine (Lightning's manual optimisation does), so without this ZeRO-3 never advances its
        micro-step (each pass overwrites the previous one's gradient partitions), and with
        `gradient_accumulation_steps: 1` (the module accumulates itself) ZeRO-2 sees a boundary at every pass and keeps
        only the last one's gradient. Other strategies need nothing."""
        engine = self.deepspeed_engine()
        if engine is None:
            return
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        if isinstance(engine.optimizer, ZeROOptimizer):
            engine.optimizer.clear_backward_seen_flag()
        engine.set_gradient_accumulation_boundary(last)

    def deepspeed_engine(self):
        return deepspeed_engine(self.module.trainer.strategy if self.module._trainer is not None else None)

    def clip_and_step(self, opt, loss: float) -> float:
        """Clip the accumulated gradient, step (unless the loss or the norm is non-finite); returns the norm."""
        engine = self.deepspeed_engine()
        if engine is not None:
            return self._deepspeed_step(opt, engine, loss)
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        if not self._finite(loss, grad_norm, "step skipped, weights unchanged"):
            opt.zero_grad()
            return grad_norm
        self._step(opt)
        return grad_norm

    def _deepspeed_step(self, opt, engine, loss: float) -> float:
        """DeepSpeed clips (to `gradient_clipping`, set from `grad_clip` in `setup`) and steps; its global norm is the
        step's. A non-finite step cannot be skipped from outside DeepSpeed's buffers, so it is counted, and
        `max_nonfinite_steps` in a row abort the run."""
        self._step(opt)
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        self._finite(loss, grad_norm, "applied by DeepSpeed")
        return grad_norm

    def _step(self, opt) -> None:
        opt.step()
        scheduler = self.module.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _finite(self, loss: float, grad_norm: float, what: str) -> bool:
        """Count consecutive non-finite steps (reset by a finite one); `max_nonfinite_steps` in a row abort."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.nonfinite = 0
            return True
        self.nonfinite += 1
        log.warning("non-finite loss (%s) or gradient norm (%s) at step %d, %s (%d in a row)",
                    loss, grad_norm, self.module.global_step, what, self.nonfinite)
        if self.nonfinite >= self.max_nonfinite_steps:
            raise FloatingPointError(f"{self.nonfinite} consecutive non-finite steps; lower the learning rate or "
                                     "raise model.max_nonfinite_steps")
        return False
