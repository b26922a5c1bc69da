"""Steps 4 and 5 of an RL step (`RubricRLModule`): the policy-gradient loss over packed micro-batches and the
optimizer step, as a mixin of the RL module (it reads the module's hyperparameters, model and optimizer).

- `completion_outputs` / `completion_stats`: the trainer's log-probs (and entropies) of the real completion tokens
  only, laid out as `layout` says (packed with varlen attention, padded rows, or shared prompt prefixes;
  `rl/microbatch.py`), through the LM head a chunk at a time (`model/lm_head.py`);
- `compute_loss`: one micro-batch's loss (`rl.policy_loss`: clipped ratio against the sampler's log-probs, entropy
  bonus, optional k3 KL and importance-sampling correction), normalised by the step's global counts so that the
  gradient does not depend on the micro-batch split or the world size;
- `optimize`: accumulate the step's gradient over `plan_microbatches`, clip it, step (`ManualStep`).

Override `compute_loss` to change the objective; the sampling and grading side stays in `rubric_rl.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qed_lightning.model.attention import packs_without_mask, varlen_kwargs
from qed_lightning.model.forward import completion_logits, shared_prefix_logits
from qed_lightning.model.lm_head import chunked_token_stats, final_hidden_states
from qed_lightning.phases import Phase
from qed_lightning.rl import entropy_from_logits, policy_loss, token_logprobs
from qed_lightning.rl.microbatch import (
    pack_sequences,
    pad_sequences,
    pad_values,
    plan_microbatches,
    plan_shared_prefix,
    scatter_tokens,
    share_prefix,
)
from qed_lightning.rollout.base import Completion

__all__ = ["MicroBatchSums", "PolicyGradientSteps"]


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
                "rollout/logprob_diff_max": self.logprob_diff_max}


class PolicyGradientSteps:
    """Loss and optimizer step of `RubricRLModule` (module docstring)."""

    @property
    def layout(self) -> str:
        """The micro-batch layout in use: `micro_batch_layout`, with "auto" resolved (see rl/microbatch.py)."""
        chosen = self.hparams.micro_batch_layout
        if chosen != "auto":
            return chosen
        if self.varlen_attention:  # flash-style attention, detected by capability (qed_lightning.model.attention)
            return "packed"
        return "padded" if self.hparams.gradient_checkpointing else "shared_prefix"

    # -- 4. loss -------------------------------------------------------------------------------------------------

    def completion_outputs(self, rollouts: list[Completion], members: list[int], model=None, hidden: bool = False):
        """Logits `[N, V]` at the positions predicting the N real completion tokens of `members` (indices into
        `rollouts`), those tokens `[N]`, and the `[n, T]` mask they belong to (row-major), laid out as `self.layout`
        says; `model` defaults to the policy. With `hidden`, the final hidden states `[N, H]` instead of the logits.
        No `[n, T_max, ...]` gather (rl/microbatch.py)."""
        prompts, completions = [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts]
        if self.layout == "shared_prefix":
            batch = share_prefix(prompts, completions, members)
            out = shared_prefix_logits(model if model is not None else self.model, batch, hidden=hidden)  # [n, T, D]
            real = batch.mask.bool()
            return out[real.to(out.device)], batch.input_ids[real].to(self.device), batch.mask.to(self.device)
        packed = (pack_sequences if self.layout == "packed" else pad_sequences)(prompts, completions, members)
        input_ids, position_ids = packed.input_ids.to(self.device), packed.position_ids.to(self.device)
        if model is None:
            call = self.hidden_states if hidden else self
            rows = call(input_ids, position_ids, packed.lengths)
        else:
            bounds = varlen_kwargs(packed.lengths, self.device) if packed.lengths and packs_without_mask(model.config) else {}
            kwargs = dict(input_ids=input_ids, position_ids=position_ids, use_cache=False, **bounds)
            rows = final_hidden_states(model, **kwargs)[0] if hidden else model(**kwargs).logits
        out, targets = completion_logits(rows, input_ids, packed)  # gathers along the last dim, logits or states
        return out, targets, packed.mask.to(self.device)

    def completion_stats(self, rollouts: list[Completion], members: list[int], model=None, entropy: bool = False):
        """Log-probs `[n, T]` (at the sampling temperature) of the completion tokens of `members`, their entropies
        (or None), and the mask `[n, T]`; chunked over the LM head unless `logits_chunk_tokens` is 0."""
        hp = self.hparams
        model = model if model is not None else self.model
        other = None if model is self.model else model
        if hp.logits_chunk_tokens:
            states, targets, mask = self.completion_outputs(rollouts, members, other, hidden=True)
            logp, ent = chunked_token_stats(states, targets, mask, model.get_output_embeddings(), hp.temperature,
                                            entropy=entropy, chunk_tokens=hp.logits_chunk_tokens)
            return logp, ent, mask
        logits, targets, mask = self.completion_outputs(rollouts, members, other)  # [N, V], [N]
        logp = scatter_tokens(token_logprobs(logits[None], targets[None], hp.temperature)[0], mask)
        ent = scatter_tokens(entropy_from_logits(logits[None], hp.temperature)[0], mask) if entropy else None
        return logp, ent, mask

    def compute_loss(self, rollouts: list[Completion], advantages: torch.Tensor, members: list[int], totals: dict[str, int]):
        """Loss of one micro-batch (`members` index `rollouts`) and its detached metrics."""
        hp = self.hparams
        device = self.device
        logp, entropy, mask = self.completion_stats(rollouts, members, entropy=hp.entropy_coef > 0)  # [n, T] each
        old = pad_values([r.logprobs for r in rollouts], members, mask.size(1)).to(device)
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref = self.completion_stats(rollouts, members, self.ref_model)[0]
        loss, metrics = policy_loss(
            logp, old, advantages[members].to(device), mask, num_sequences=totals["sequences"], clip_low=hp.clip_low,
            clip_high=hp.clip_high, aggregation=hp.aggregation, entropy=entropy, entropy_coef=hp.entropy_coef,
            ref_logprobs=ref, kl_coef=hp.kl_coef, num_tokens=totals["tokens"], max_len=totals["max_len"],
            is_correction=hp.is_correction, is_cap=hp.is_cap,
        )
        diff = (logp.detach() - old).abs() * mask
        metrics["logprob_diff_sum"] = diff.sum()
        metrics["logprob_diff_max"] = diff.max()
        return loss, metrics

    # -- 5. step -------------------------------------------------------------------------------------------------

    def optimize(self, rollouts: list[Completion], advantages: torch.Tensor, valid: torch.Tensor,
                 progress: Phase | None = None) -> dict[str, float]:
        """Accumulate the step's gradient over packed micro-batches, clip, and take one optimizer step. `progress`
        (the "train" phase) learns the number of micro-batches and advances once per micro-batch."""
        members = [i for i in range(len(rollouts)) if bool(valid[i]) and rollouts[i].completion_ids]
        lengths = [len(rollouts[i].completion_ids) for i in members]
        step = self.optim_step
        totals = step.totals(len(members), sum(lengths), max(lengths, default=1))
        opt = self.optimizers()
        opt.zero_grad()
        sums = MicroBatchSums()
        plan = self.plan_microbatches(rollouts, members)
        passes = len(plan) + step.missing_microbatches(len(plan))  # the same on every rank
        if progress is not None:
            progress.total = len(plan)
        for i, mb in enumerate(plan):
            step.before_pass(last=i == passes - 1)
            loss, metrics = self.compute_loss(rollouts, advantages, mb, totals)
            self.manual_backward(loss * self.trainer.world_size)  # DDP/FSDP average over ranks; see ManualStep.totals
            sums.add(loss, metrics, totals["tokens"])
            if progress is not None:
                progress.advance()
        for i in range(len(plan), passes):
            step.before_pass(last=i == passes - 1)
            self.manual_backward(step.idle_loss())
        sums.loss = step.sum_over_ranks(sums.loss)  # each rank holds its part of the step's loss
        grad_norm = step.clip_and_step(opt, sums.loss)
        return {**sums.metrics(totals["tokens"]), "train/grad_norm": grad_norm,
                "train/nonfinite_skipped": float(step.nonfinite > 0), "train/micro_batches": float(len(plan))}

    def plan_microbatches(self, rollouts: list[Completion], members: list[int]) -> list[list[int]]:
        """Split `members` (indices into `rollouts`) into micro-batches of about `micro_batch_tokens` tokens."""
        budget = self.hparams.micro_batch_tokens
        if self.layout == "shared_prefix":
            return plan_shared_prefix([r.prompt_ids for r in rollouts], [len(r.completion_ids) for r in rollouts], members, budget)
        lengths = [len(rollouts[i].prompt_ids) + len(rollouts[i].completion_ids) for i in members]
        return [[members[j] for j in mb] for mb in plan_microbatches(lengths, budget, self.layout)]
