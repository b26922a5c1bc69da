"""Stage 2: GRPO-style RL with rubric-based LLM-judge rewards (SPEC 4).

One optimizer step = sample, grade, advantage, loss, step:
1. sample: `group_size` (G) rollouts of each of the step's prompts from the rollout engine, at temperature T, with
   the sampler's log-prob of every token;
2. grade: the judge scores the text after the last `</think>` against the problem's rubric, reward = score / 7;
3. advantage: `r - mean(group)` (no std division, as the reference); failed grades are zero (paper) or dropped;
4. loss: the clipped importance-ratio objective with `logp` from logits / T and `logp_old` from the sampler,
   entropy bonus, optional k3 KL; aggregated as a token sum over the step divided by its sequence count, over
   packed micro-batches (`micro_batch_tokens`) whose gradients accumulate to exactly the full-step gradient;
5. step: gradient-norm clipping, optimizer and LR schedule; the engine receives the new weights
   (`WeightSyncCallback`, returned by `configure_callbacks`).

Where we differ from the paper: the paper generates asynchronously on separate GPUs, up to ~1 step off-policy.
Colocated (the default layout), each step here is on-policy unless `sync_interval > 1`; the ratio rho corrects
either way. The one-node asynchronous layout (`configs/layout/one_node_async.yaml`, `rollout.streaming_engine`) is
the paper's: steps 1-2 run in a background stream and the step takes its first complete groups
(`sample_and_grade`). Optional truncated importance sampling (`is_correction`, off in the paper) bounds the weight
of tokens the sampler and the trainer disagree on (see `rl/losses.py`).

Override points: `compute_rewards(problems, rollouts)` and `compute_loss(...)`; `rl_step(prompts)` (sample, grade,
advantage, loss, step on a list of prompts) is what `ReasoningCacheRLModule` reuses on its RC states;
`sample_and_grade(batch)` (steps 1-2: generate and grade the batch, or take the stream's groups) and
`stream_prompts(problem, release)` (the GRPO prompts a streamed problem becomes). Components:
`engine` (`VLLMEngine`, `HFEngine`, ...) and `judge` (`RubricJudge` with any client) are injected by `class_path`.
Timing: each named step runs in a phase of `self.phases` (`modules/phases.py`: "generate", "grade", "train"; the
"train" phase advances once per micro-batch), whose times are the `time/*_s` metrics and whose listeners may follow it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from qed_lightning.data.rl import ProofProblem
from qed_lightning.lm_head import chunked_token_stats, final_hidden_states
from qed_lightning.modules.base import QEDModule
from qed_lightning.modules.optim_step import ManualStep
from qed_lightning.modules.phases import Phase, StepPhases
from qed_lightning.modules.rl_metrics import gather_objects, reduce_over_ranks, rollout_table, table_metrics
from qed_lightning.rewards import GradeRequest, RubricJudge
from qed_lightning.rl import entropy_from_logits, group_advantages_masked, policy_loss, token_logprobs
from qed_lightning.rl.losses import ISCorrection
from qed_lightning.rl.microbatch import (
    completion_logits,
    pack_sequences,
    pad_sequences,
    pad_values,
    plan_microbatches,
    plan_shared_prefix,
    share_prefix,
    shared_prefix_logits,
)
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.rollout.sync import WeightSyncCallback

log = logging.getLogger(__name__)


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


class RubricRLModule(QEDModule):
    """Rubric-reward GRPO (stage 2). See the module docstring for the algorithm.

    Args (and `QEDModule`'s, passed through `**kwargs`):
        engine: rollout engine component. judge: reward component (a `RubricJudge`).
        group_size: rollouts per prompt (G). temperature/top_p/top_k/max_new_tokens: sampling.
        micro_batch_tokens: token budget of one forward/backward pass.
        micro_batch_layout: how a micro-batch goes through the model (rl/microbatch.py): "packed" (one row, varlen
            flash attention), "padded" (right-padded rows), "shared_prefix" (each prompt once, its G completions
            attending to its cached keys/values); "auto" = packed with flash attention, else shared_prefix, or
            padded under gradient checkpointing. All give the same gradient.
        logits_chunk_tokens: completion tokens per LM-head chunk: log-probs and entropies come from the hidden
            states a chunk at a time under checkpointing, never as `[n, T, V]` logits (qed_lightning.lm_head);
            0 = all logits of a micro-batch at once.
        clip_low/clip_high: ratio clip range [1 - clip_low, 1 + clip_high]. entropy_coef: entropy bonus.
        kl_coef: k3 KL weight against the frozen initial policy (0 = no reference model is loaded).
        aggregation: "seq_sum_over_batch" (paper), "token_mean", "seq_mean_token_mean", "dr_grpo".
        advantage_scale: "none" (paper) or "std". grad_clip: max gradient norm (0 = off).
        is_correction: importance-sampling correction of the sampler/trainer gap: "none" (paper), "tis" (truncated:
            a token's weight is min(rho, is_cap)) or "mask" (tokens with rho outside [1/is_cap, is_cap] leave the
            objective); `train/is_frac` is the share of tokens it touched. is_cap: the cap (> 1).
        sync_interval: optimizer steps between weight pushes to the engine.
        max_nonfinite_steps: consecutive steps with a non-finite loss/gradient (skipped) before the run aborts.
        val_samples: rollouts per problem in the validation pass. seed: sampling seed base.
    """

    def __init__(
        self,
        model_name_or_path: str,
        engine: RolloutEngine,
        judge: RubricJudge,
        group_size: int = 16,
        temperature: float = 0.8,
        top_p: float = 1.0,
        top_k: int = -1,
        max_new_tokens: int = 49152,
        micro_batch_tokens: int = 65536,
        micro_batch_layout: Literal["auto", "packed", "padded", "shared_prefix"] = "auto",
        logits_chunk_tokens: int = 1024,
        clip_low: float = 4.0,
        clip_high: float = 4.0,
        entropy_coef: float = 1e-4,
        kl_coef: float = 0.0,
        aggregation: Literal["seq_sum_over_batch", "token_mean", "seq_mean_token_mean", "dr_grpo"] = "seq_sum_over_batch",
        advantage_scale: Literal["none", "std"] = "none",
        grad_clip: float = 0.3,
        is_correction: ISCorrection = "none",
        is_cap: float = 2.0,
        sync_interval: int = 1,
        max_nonfinite_steps: int = 3,
        val_samples: int = 1,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(model_name_or_path, **kwargs)  # QEDModule's arguments (jsonargparse reads them through kwargs)
        problems = []
        if group_size < 1:
            problems.append(f"model.group_size must be >= 1, got {group_size}")
        if temperature <= 0:
            problems.append(f"model.temperature must be > 0 for RL sampling, got {temperature}")
        if max_new_tokens < 1 or micro_batch_tokens < 1:
            problems.append("model.max_new_tokens and model.micro_batch_tokens must be >= 1")
        if is_cap <= 1.0:
            problems.append(f"model.is_cap must be > 1 (a cap on the ratio rho), got {is_cap}")
        if logits_chunk_tokens < 0:
            problems.append(f"model.logits_chunk_tokens must be >= 0 (0 = no chunking), got {logits_chunk_tokens}")
        if micro_batch_layout == "shared_prefix" and self.hparams.gradient_checkpointing:
            problems.append("model.micro_batch_layout=shared_prefix needs the key/value cache, which gradient "
                            "checkpointing disables; use 'auto', 'padded' or 'packed', or model.gradient_checkpointing=false")
        if top_p < 1.0 or top_k > 0:
            log.warning("top_p/top_k truncation changes the sampler's log-probs; the importance ratio assumes plain temperature sampling")
        if problems:
            raise ValueError("; ".join(problems))
        self.engine = engine
        self.judge = judge
        self.ref_model = None
        self.automatic_optimization = False
        self.optim_step = ManualStep(self, grad_clip, max_nonfinite_steps)  # clipping, step, non-finite counter
        self.phases = StepPhases()  # the step's named, timed phases (reset per step; listeners may watch them)

    _hparams_ignore = ("optimizer", "lr_scheduler", "engine", "judge")

    def setup(self, stage: str) -> None:
        """Errors at the door: every prompt plus the completion budget must fit the engine's context. Under DeepSpeed,
        hand `grad_clip` to DeepSpeed (this hook runs before the engine is built): ZeRO keeps gradients in its own
        partitioned buffers, so `p.grad` is None and only DeepSpeed can clip them (`optim_step`)."""
        self.optim_step.hand_grad_clip_to_deepspeed()
        limit = self.engine.max_model_len
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        problems = [*getattr(datamodule, "train_problems", []), *getattr(datamodule, "val_problems", [])]
        if limit is None or not problems:
            return
        longest = max(problems, key=lambda p: len(p.prompt_ids))
        need = len(longest.prompt_ids) + self.hparams.max_new_tokens
        if need > limit:
            raise ValueError(
                f"model.engine.init_args.max_model_len={limit} is shorter than the longest prompt ({len(longest.prompt_ids)} "
                f"tokens, problem row {longest.index}) plus model.max_new_tokens={self.hparams.max_new_tokens}; raise "
                f"max_model_len to at least {need}, or lower max_new_tokens / data.max_prompt_tokens.")

    @property
    def layout(self) -> str:
        """The micro-batch layout in use: `micro_batch_layout`, with "auto" resolved (see rl/microbatch.py)."""
        chosen = self.hparams.micro_batch_layout
        if chosen != "auto":
            return chosen
        impl = str(getattr(getattr(self.model, "config", None), "_attn_implementation", ""))
        if impl.startswith("flash"):
            return "packed"
        return "padded" if self.hparams.gradient_checkpointing else "shared_prefix"

    def configure_callbacks(self):
        return [WeightSyncCallback(self.engine, self.hparams.sync_interval), *self.engine.callbacks()]

    def configure_model(self) -> None:
        super().configure_model()
        if self.hparams.kl_coef > 0 and self.ref_model is None:
            from transformers import AutoModelForCausalLM

            self.ref_model = AutoModelForCausalLM.from_pretrained(self.hparams.model_name_or_path, dtype=self.model.dtype).eval()
            self.ref_model.requires_grad_(False)

    # -- 1. sample -----------------------------------------------------------------------------------------------

    def sampling(self, problems: list[ProofProblem], step: int | None = None) -> SamplingConfig:
        """The step's sampling settings, seeded by (seed, step, problem): reproducible across resumes and ranks.
        `step` defaults to the current one (`AsyncRollouts` asks for the next step's settings ahead of time)."""
        hp = self.hparams
        step = self.global_step if step is None else step
        seeds = tuple(hp.seed + 100_003 * step + 7_919 * p.index for p in problems)
        return SamplingConfig(hp.temperature, hp.top_p, hp.top_k, hp.max_new_tokens, seeds=seeds)

    def generate_rollouts(self, problems: list[ProofProblem], n: int) -> list[Completion]:
        """`[P * n]` completions, the n of one problem adjacent."""
        groups = self.engine.generate([p.prompt_ids for p in problems], self.sampling(problems), n=n)
        return [c for group in groups for c in group]

    # -- 2. grade ------------------------------------------------------------------------------------------------

    def compute_rewards(self, problems: list[ProofProblem], rollouts: list[Completion]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Rewards `[N]`, validity mask `[N]` (False = dropped judge failure) and the grades. Override to change the reward."""
        n = len(rollouts) // len(problems)
        requests = [GradeRequest(problem=problems[i // n].problem, rubric=problems[i // n].rubric, response=c.text)
                    for i, c in enumerate(rollouts)]
        grades = self.judge.grade(requests)
        rewards = torch.tensor([g.reward if g.reward is not None else 0.0 for g in grades])
        valid = torch.tensor([g.reward is not None for g in grades])
        return rewards, valid, grades

    # -- 4. loss -------------------------------------------------------------------------------------------------

    def completion_outputs(self, rollouts: list[Completion], members: list[int], model=None, hidden: bool = False):
        """Logits `[n, T, V]` predicting the completion tokens of `members` (indices into `rollouts`), those tokens
        `[n, T]` and their mask `[n, T]`, laid out as `self.layout` says; `model` defaults to the policy. With
        `hidden`, the final hidden states `[n, T, H]` that predict them instead of the logits."""
        prompts, completions = [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts]
        if self.layout == "shared_prefix":
            batch = share_prefix(prompts, completions, members)
            out = shared_prefix_logits(model if model is not None else self.model, batch, hidden=hidden)
            return out, batch.input_ids.to(self.device), batch.mask.to(self.device)
        packed = (pack_sequences if self.layout == "packed" else pad_sequences)(prompts, completions, members)
        input_ids, position_ids = packed.input_ids.to(self.device), packed.position_ids.to(self.device)
        if model is None:
            rows = self.hidden_states(input_ids, position_ids) if hidden else self(input_ids, position_ids)
        elif hidden:
            rows = final_hidden_states(model, input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
        else:
            rows = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        out, targets = completion_logits(rows, input_ids, packed)  # gathers along the last dim, logits or states
        return out, targets, packed.mask.to(self.device)

    def completion_stats(self, rollouts: list[Completion], members: list[int], model=None, entropy: bool = False):
        """Log-probs `[n, T]` (at the sampling temperature) of the completion tokens of `members`, their entropies
        (or None), and the mask `[n, T]`; chunked over the LM head unless `logits_chunk_tokens` is 0."""
        hp = self.hparams
        model = model if model is not None else self.model
        if hp.logits_chunk_tokens:
            states, targets, mask = self.completion_outputs(rollouts, members, None if model is self.model else model, hidden=True)
            logp, ent = chunked_token_stats(states, targets, mask, model.get_output_embeddings(), hp.temperature,
                                            entropy=entropy, chunk_tokens=hp.logits_chunk_tokens)
            return logp, ent, mask
        logits, targets, mask = self.completion_outputs(rollouts, members, None if model is self.model else model)
        logp = token_logprobs(logits, targets, hp.temperature) * mask
        ent = entropy_from_logits(logits, hp.temperature) * mask if entropy else None
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
        if progress is not None:
            progress.total = len(plan)
        for mb in plan:
            loss, metrics = self.compute_loss(rollouts, advantages, mb, totals)
            self.manual_backward(loss * self.trainer.world_size)  # DDP/FSDP average over ranks; see ManualStep.totals
            sums.add(loss, metrics, totals["tokens"])
            if progress is not None:
                progress.advance()
        for _ in range(step.missing_microbatches(len(plan))):
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

    # -- the step, as a list of named steps ----------------------------------------------------------------------

    def training_step(self, batch: list[ProofProblem], batch_idx: int) -> None:
        metrics, _, _ = self.rl_step(batch)
        self.log_step(metrics, len(batch))

    def rl_step(self, batch: list[ProofProblem]) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """Sample, grade, advantage, loss and step on `batch` (each item one GRPO prompt: its `prompt_ids`, graded
        against its `problem` and `rubric`); returns the metrics, the rewards `[P * G]` and their validity `[P * G]`.
        Each named step runs in a phase of `self.phases` ("generate", "grade", "train"; "wait" in the streaming
        layout), which times it."""
        hp = self.hparams
        version = self.global_step  # the weights' version now; the optimizer step below increments it
        rollouts, rewards, valid, grades, stream_metrics = self.sample_and_grade(batch)  # 1. sample + 2. grade
        with self.phases.phase("train") as progress:
            advantages = group_advantages_masked(rewards, valid, hp.group_size, scale=hp.advantage_scale)  # 3. advantage
            self.engine.sleep()
            metrics = self.optimize(rollouts, advantages, valid, progress)  # 4. loss + 5. step
        metrics.update(self.step_metrics(rollouts, rewards, valid, grades, version))  # 6. metrics
        metrics.update(stream_metrics)
        return metrics, rewards, valid

    def sample_and_grade(self, batch: list[ProofProblem]) -> tuple[list[Completion], torch.Tensor, torch.Tensor, list, dict]:
        """Steps 1-2: the rollouts `[P * G]`, rewards, validity, grades and extra metrics of this step. Sequential
        layouts generate `batch` ("generate" phase) and grade it ("grade"). With a group stream (the asynchronous
        layout, `rollout.streaming`), both already ran in the background: the step takes the stream's first complete
        groups ("wait" phase: the time the trainer waited for them), and `batch` only paces the steps; the groups
        taken are `self.engine.group_stream().last`. (A group filter, e.g. dynamic sampling, goes to `take(accept=)`.)"""
        stream = self.engine.group_stream()
        if stream is not None:
            with self.phases.phase("wait"):
                taken = stream.take(self.global_step)
            return taken.rollouts, taken.rewards, taken.valid, taken.grades, taken.metrics
        with self.phases.phase("generate"):
            rollouts = self.generate_rollouts(batch, self.hparams.group_size)
        with self.phases.phase("grade"):
            rewards, valid, grades = self.compute_rewards(batch, rollouts)
        return rollouts, rewards, valid, grades, {}

    def stream_prompts(self, problem: ProofProblem, release: int) -> list[ProofProblem]:
        """The GRPO prompts a streamed problem becomes (stage 2: the problem itself); `release` is the step whose
        data it came with (its seeds). Runs in the stream's threads."""
        return [problem]

    def step_metrics(self, rollouts: list[Completion], rewards: torch.Tensor, valid: torch.Tensor, grades: list,
                     version: int) -> dict[str, float]:
        """rollout/* and judge/score_* of the whole step (every rank's rollouts, see rl_metrics), the judge's
        counters, the phase times and the step's throughput."""
        table = torch.cat(gather_objects(rollout_table(rollouts, rewards, valid, grades)))
        metrics = table_metrics(table, self.hparams.group_size, version)
        metrics.update(self.judge.pop_metrics())
        metrics.update(self.phases.metrics())
        tokens = sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
        seconds = sum(self.phases.seconds.get(name, 0.0) for name in ("generate", "grade", "wait", "train"))
        metrics["train/tokens_per_sec"] = tokens / max(seconds, 1e-9)
        return metrics

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.phases.reset()

    def log_step(self, metrics: dict[str, float], batch_size: int) -> None:
        """Log a step's metrics; under data parallelism, combined over ranks first (`rl_metrics.reduce_op`)."""
        metrics = reduce_over_ranks(metrics)
        self.log_dict(metrics, batch_size=batch_size)
        self.log("reward", metrics["rollout/reward_mean"], prog_bar=True, logger=False, batch_size=batch_size)

    def validation_step(self, batch: list[ProofProblem], batch_idx: int) -> None:
        rollouts = self.generate_rollouts(batch, self.hparams.val_samples)
        rewards, valid, grades = self.compute_rewards(batch, rollouts)
        kept = rewards[valid]
        judge = {f"val/{k.replace('/', '_')}": v for k, v in self.judge.pop_metrics().items()}
        self.log_dict(judge, batch_size=len(batch))
        self.log("val/reward_mean", kept.mean() if kept.numel() else torch.tensor(0.0), batch_size=len(batch))
        self.log("val/truncated_frac", sum(r.truncated for r in rollouts) / len(rollouts), batch_size=len(batch))
