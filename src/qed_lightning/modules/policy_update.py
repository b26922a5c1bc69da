"""Steps 4 and 5 of an RL step: one optimizer step over the step's rollouts, as one object (`PolicyUpdate`).

`RubricRLModule.rl_step` hands it the step's rollouts, advantages and loss mask and its objective (`compute_loss`,
the module's override point); the update owns everything between that and new weights:
- the micro-batch layout, resolved once (`micro_batch_layout`, "auto" by the attention backend's capability): packed
  rows with varlen attention, padded rows, or shared prompt prefixes (`rl/microbatch.py` plans and packs,
  `model/forward.py` runs the model, a chunk of the LM head at a time);
- `token_stats`: the trainer's log-probs (and entropies) of the real completion tokens only, which the objective
  compares with the sampler's;
- step-wide counts over all ranks (`totals`), so each micro-batch's loss is normalised as one process would be and
  the gradient does not depend on the micro-batch split or the world size;
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

The host is the LightningModule (manual optimisation) that builds the update; what the update reads from it is its
`trainer`, `device`, `model` (and `ref_model`), `parameters()`, `optimizers()`, `lr_schedulers()`,
`manual_backward`, `all_gather`, and the packed forward calls `hidden_states` / `__call__` (`QEDModule`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch

from qed_lightning.model.attention import packs_without_mask, varlen_kwargs
from qed_lightning.metrics import Max, Phase
from qed_lightning.model.forward import (
    chunked_token_stats,
    completion_logits,
    entropy_from_logits,
    final_hidden_states,
    shared_prefix_logits,
    token_logprobs,
)
from qed_lightning.parallel.distributed import deepspeed_engine, is_deepspeed
from qed_lightning.rl.microbatch import (
    pack_sequences,
    pad_sequences,
    plan_microbatches,
    plan_shared_prefix,
    scatter_tokens,
    share_prefix,
)
from qed_lightning.rollout.base import Completion

__all__ = ["LossFn", "MicroBatchSums", "PolicyUpdate", "resolve_layout"]

log = logging.getLogger(__name__)

#: the objective of one micro-batch: `(rollouts, advantages, members, totals) -> (loss, detached metrics)`
LossFn = Callable[[list[Completion], torch.Tensor, list[int], dict[str, int]], tuple[torch.Tensor, dict]]


@dataclass
class MicroBatchSums:
    """The step's metrics, accumulated over its micro-batches: the loss (a sum: each micro-batch's loss is already
    normalised by the step's counts), |trainer - sampler| log-prob sum and max, and the token-weighted clip fraction
    and entropy."""

    loss: float = 0.0
    logprob_diff_sum: float = 0.0
    logprob_diff_max: float = 0.0
    clip_frac: float = 0.0
    entropy: float = 0.0
    is_frac: float = 0.0

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], step_tokens: int) -> None:
        weight = float(metrics["num_tokens"]) / step_tokens  # this micro-batch's share of the step's tokens
        self.loss += float(loss.detach())
        self.logprob_diff_sum += float(metrics["logprob_diff_sum"])
        self.logprob_diff_max = max(self.logprob_diff_max, float(metrics["logprob_diff_max"]))
        self.clip_frac += float(metrics["clip_frac"]) * weight
        self.entropy += float(metrics.get("entropy", torch.tensor(0.0))) * weight
        self.is_frac += float(metrics.get("is_frac", torch.tensor(0.0))) * weight

    def metrics(self, step_tokens: int) -> dict[str, float]:
        return {"train/loss": self.loss, "train/clip_frac": self.clip_frac, "train/entropy": self.entropy,
                "train/is_frac": self.is_frac,
                "rollout/logprob_diff_mean": self.logprob_diff_sum / step_tokens,
                "rollout/logprob_diff_max": Max(self.logprob_diff_max)}


def resolve_layout(chosen: str, varlen: bool, gradient_checkpointing: bool) -> str:
    """`micro_batch_layout` with "auto" resolved: packed under varlen (flash-style) attention, else shared_prefix, or
    padded under gradient checkpointing (which disables the key/value cache shared_prefix needs)."""
    if chosen != "auto":
        return chosen
    if varlen:
        return "packed"
    return "padded" if gradient_checkpointing else "shared_prefix"


class PolicyUpdate:
    """One optimizer step of `host` over a step's rollouts; see the module docstring.

    Args:
        host: the manual-optimisation LightningModule that owns the model and the optimizer.
        micro_batch_layout: "auto", "packed", "padded" or "shared_prefix" (resolved once, at the first use).
        micro_batch_tokens: token budget of one forward/backward pass.
        logits_chunk_tokens: completion tokens per LM-head chunk (0 = all logits at once).
        temperature: the sampling temperature the trainer divides its logits by.
        grad_clip: max gradient norm (0 = no clipping, the norm is still computed and logged).
        max_nonfinite_steps: consecutive non-finite steps (each skipped) before the run aborts.
    """

    def __init__(self, host: L.LightningModule, micro_batch_layout: str = "auto", micro_batch_tokens: int = 65536,
                 logits_chunk_tokens: int = 1024, temperature: float = 1.0, grad_clip: float = 0.0,
                 max_nonfinite_steps: int = 3) -> None:
        self.host = host
        self.chosen_layout = micro_batch_layout
        self.micro_batch_tokens = micro_batch_tokens
        self.logits_chunk_tokens = logits_chunk_tokens
        self.temperature = temperature
        self.grad_clip = grad_clip
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite = 0  #: consecutive non-finite steps so far (0 after a finite one)
        self._layout: str | None = None

    @property
    def layout(self) -> str:
        """The micro-batch layout in use, resolved once the model exists (its attention backend decides "auto")."""
        if self._layout is None:
            host = self.host
            varlen = host.model is not None and packs_without_mask(host.model.config)
            layout = resolve_layout(self.chosen_layout, varlen, bool(host.hparams.get("gradient_checkpointing")))
            if host.model is None:
                return layout
            self._layout = layout
        return self._layout

    @property
    def _world(self) -> int:
        return self.host.trainer.world_size

    # -- 4. the trainer's view of the rollouts -------------------------------------------------------------------

    def outputs(self, rollouts: list[Completion], members: list[int], model=None, hidden: bool = False):
        """Logits `[N, V]` at the positions predicting the N real completion tokens of `members` (indices into
        `rollouts`), those tokens `[N]`, and the `[n, T]` mask they belong to (row-major), laid out as `layout`
        says; `model` defaults to the policy. With `hidden`, the final hidden states `[N, H]` instead of the logits.
        No `[n, T_max, ...]` gather (rl/microbatch.py)."""
        host, device = self.host, self.host.device
        prompts, completions = [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts]
        if self.layout == "shared_prefix":
            batch = share_prefix(prompts, completions, members)
            out = shared_prefix_logits(model if model is not None else host.model, batch, hidden=hidden)  # [n, T, D]
            real = batch.mask.bool()
            return out[real.to(out.device)], batch.input_ids[real].to(device), batch.mask.to(device)
        packed = (pack_sequences if self.layout == "packed" else pad_sequences)(prompts, completions, members)
        input_ids, position_ids = packed.input_ids.to(device), packed.position_ids.to(device)
        if model is None:  # the policy, through the host's packed forward (varlen boundaries, FSDP2 hooks)
            call = host.hidden_states if hidden else host
            rows = call(input_ids, position_ids, packed.lengths)
        else:
            varlen = packed.lengths and packs_without_mask(model.config)
            bounds = varlen_kwargs(packed.lengths, device) if varlen else {}
            kwargs = dict(input_ids=input_ids, position_ids=position_ids, use_cache=False, **bounds)
            rows = final_hidden_states(model, **kwargs)[0] if hidden else model(**kwargs).logits
        out, targets = completion_logits(rows, input_ids, packed)  # gathers along the last dim, logits or states
        return out, targets, packed.mask.to(device)

    def token_stats(self, rollouts: list[Completion], members: list[int], model=None, entropy: bool = False):
        """Log-probs `[n, T]` (at the sampling temperature) of the completion tokens of `members`, their entropies
        (or None), and the mask `[n, T]`; chunked over the LM head unless `logits_chunk_tokens` is 0. `model`: another
        model than the policy (the frozen reference)."""
        policy = self.host.model
        other = None if model is None or model is policy else model
        if self.logits_chunk_tokens:
            states, targets, mask = self.outputs(rollouts, members, other, hidden=True)
            head = (other if other is not None else policy).get_output_embeddings()
            logp, ent = chunked_token_stats(states, targets, mask, head, self.temperature, entropy=entropy,
                                            chunk_tokens=self.logits_chunk_tokens)
            return logp, ent, mask
        logits, targets, mask = self.outputs(rollouts, members, other)  # [N, V], [N]
        logp = scatter_tokens(token_logprobs(logits[None], targets[None], self.temperature)[0], mask)
        ent = scatter_tokens(entropy_from_logits(logits[None], self.temperature)[0], mask) if entropy else None
        return logp, ent, mask

    def plan(self, rollouts: list[Completion], members: list[int]) -> list[list[int]]:
        """Split `members` (indices into `rollouts`) into micro-batches of about `micro_batch_tokens` tokens."""
        if self.layout == "shared_prefix":
            return plan_shared_prefix([r.prompt_ids for r in rollouts], [len(r.completion_ids) for r in rollouts],
                                      members, self.micro_batch_tokens)
        lengths = [len(rollouts[i].prompt_ids) + len(rollouts[i].completion_ids) for i in members]
        return [[members[j] for j in mb] for mb in plan_microbatches(lengths, self.micro_batch_tokens, self.layout)]

    # -- 5. the step ---------------------------------------------------------------------------------------------

    def run(self, rollouts: list[Completion], advantages: torch.Tensor, valid: torch.Tensor, loss_fn: LossFn,
            progress: Phase | None = None) -> dict[str, float]:
        """Accumulate the step's gradient of `loss_fn` over packed micro-batches, clip, and take one optimizer step.
        `progress` (the "train" phase) learns the number of micro-batches and advances once per micro-batch."""
        host = self.host
        members = [i for i in range(len(rollouts)) if bool(valid[i]) and rollouts[i].completion_ids]
        lengths = [len(rollouts[i].completion_ids) for i in members]
        totals = self.totals(len(members), sum(lengths), max(lengths, default=1))
        opt = host.optimizers()
        opt.zero_grad()
        sums = MicroBatchSums()
        plan = self.plan(rollouts, members)
        passes = len(plan) + self.missing_microbatches(len(plan))  # the same on every rank
        if progress is not None:
            progress.total = len(plan)
        for i, mb in enumerate(plan):
            self.before_pass(last=i == passes - 1)
            loss, metrics = loss_fn(rollouts, advantages, mb, totals)
            host.manual_backward(loss * self._world)  # DDP/FSDP average over ranks; see `totals`
            sums.add(loss, metrics, totals["tokens"])
            if progress is not None:
                progress.advance()
        for i in range(len(plan), passes):
            self.before_pass(last=i == passes - 1)
            host.manual_backward(self.idle_loss())
        sums.loss = self.sum_over_ranks(sums.loss)  # each rank holds its part of the step's loss
        grad_norm = self.clip_and_step(opt, sums.loss)
        return {**sums.metrics(totals["tokens"]), "train/grad_norm": grad_norm,
                "train/nonfinite_skipped": float(self.nonfinite > 0), "train/micro_batches": float(len(plan))}

    def totals(self, sequences: int, tokens: int, max_len: int) -> dict[str, int]:
        """The optimizer step's sequence/token counts and longest completion, over all ranks.

        Each rank normalises its token sum by the *global* counts, and its loss is multiplied by the world size
        before backward, because data-parallel strategies average gradients: the result is exactly the paper's
        `-(1/B) sum L` over the whole step, however the sequences are spread over ranks and micro-batches.
        """
        local = torch.tensor([sequences, tokens, max_len], dtype=torch.float64, device=self.host.device)
        if self._world > 1:
            gathered = self.host.all_gather(local)  # [W, 3]
            local = torch.cat([gathered[:, :2].sum(0), gathered[:, 2].max().reshape(1)])
        return {"sequences": max(int(local[0]), 1), "tokens": max(int(local[1]), 1), "max_len": max(int(local[2]), 1)}

    def missing_microbatches(self, n: int) -> int:
        """Passes this rank adds so that all ranks run as many forward/backward passes: each pass is a collective
        under DDP and FSDP, and a rank with fewer packed micro-batches would leave the others waiting forever."""
        if self._world == 1:
            return 0
        most = self.host.trainer.strategy.reduce(torch.tensor(float(n), device=self.host.device), reduce_op="max")
        return int(most) - n

    def idle_loss(self) -> torch.Tensor:
        """A zero loss through the whole model (one token): a pass's collectives, no gradient contribution."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.host.device)
        return self.host(ids, ids).sum() * 0.0

    def sum_over_ranks(self, value: float) -> float:
        if self._world == 1:
            return value
        total = torch.tensor(value, dtype=torch.float64, device=self.host.device)
        return float(self.host.trainer.strategy.reduce(total, reduce_op="sum"))

    def hand_grad_clip_to_deepspeed(self) -> None:
        """Under DeepSpeed, write `grad_clip` into its config's `gradient_clipping`; call from `setup`, which runs
        before Lightning builds the engine (and Lightning keeps a value that is already there)."""
        strategy = self.host.trainer.strategy if self.host._trainer is not None else None
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
        return deepspeed_engine(self.host.trainer.strategy if self.host._trainer is not None else None)

    def clip_and_step(self, opt, loss: float) -> float:
        """Clip the accumulated gradient, step (unless the loss or the norm is non-finite); returns the norm."""
        engine = self.deepspeed_engine()
        if engine is not None:
            return self._deepspeed_step(opt, engine, loss)
        params = [p for p in self.host.parameters() if p.grad is not None]
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
        scheduler = self.host.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _finite(self, loss: float, grad_norm: float, what: str) -> bool:
        """Count consecutive non-finite steps (reset by a finite one); `max_nonfinite_steps` in a row abort."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.nonfinite = 0
            return True
        self.nonfinite += 1
        log.warning("non-finite loss (%s) or gradient norm (%s) at step %d, %s (%d in a row)",
                    loss, grad_norm, self.host.global_step, what, self.nonfinite)
        if self.nonfinite >= self.max_nonfinite_steps:
            raise FloatingPointError(f"{self.nonfinite} consecutive non-finite steps; lower the learning rate or "
                                     "raise model.max_nonfinite_steps")
        return False
