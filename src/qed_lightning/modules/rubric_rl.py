"""Stage 2: GRPO-style RL with rubric-based LLM-judge rewards (SPEC 4).

One optimizer step = sample, grade, advantage, loss, step:
1. sample: `group_size` (G) rollouts of each of the step's prompts from the rollout engine, at temperature T, with
   the sampler's log-prob of every token;
2. grade: the judge scores the text after the last `</think>` against the problem's rubric, reward = score / 7;
3. advantage: `r - mean(group)` (no std division, as the reference); failed grades are zero (paper) or dropped,
   and past the judge's `max_failure_fraction` of the step's grades the run stops instead (`judge/failure_fraction`);
4. loss: the clipped importance-ratio objective with `logp` from logits / T and `logp_old` from the sampler,
   entropy bonus, optional k3 KL; aggregated as a token sum over the step divided by its sequence count, over
   packed micro-batches (`micro_batch_tokens`) whose gradients accumulate to exactly the full-step gradient;
5. step: gradient-norm clipping, optimizer and LR schedule; the engine receives the new weights
   (`WeightSyncCallback`, returned by `configure_callbacks`).
Steps 1-3 and the objective of step 4 (`compute_loss`) are here; the micro-batch loop and the optimizer step are
one object, `modules/policy_update.py` (`PolicyUpdate`), which the module builds and calls with its objective.

Where we differ from the paper: the paper generates asynchronously on separate GPUs, up to ~1 step off-policy.
Colocated (the default layout), each step here is on-policy unless `sync_interval > 1`; the ratio rho corrects
either way. The one-node asynchronous layout (`configs/layout/one_node_async.yaml`, `rollout.streaming_engine`) is
the paper's: steps 1-2 run in a background stream and the step takes its first complete groups
(`sample_and_grade`). Options the paper does not use (off by default): dynamic sampling (`skip_flat_groups`,
`modules/groups.py`: groups whose rewards are all equal are replaced from the batch's spare prompts, or
in the stream by the next problems), the soft overlong penalty (`overlong_buffer`, `overlong_penalty`), masking
truncated completions out of the loss (`mask_truncated`) and truncated importance sampling (`is_correction`:
bounds the weight of tokens the sampler and the trainer disagree on, `rl/objective.py`).

Override points (docs/extending.md): `compute_rewards`, `compute_loss`, `rl_step` (what `ReasoningCacheRLModule`
reuses on its RC states), `sample_and_grade`, `stream_prompts`; `engine` and `judge` are injected by `class_path`.
Each named step runs in a timed phase of `self.phases` (`metrics.py`); before the step's first collective the ranks
meet (`self.rendezvous`, bounded by `step_wait_timeout_s`), so a rank left behind ends the run naming its phase.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from qed_lightning.data.loading import ConfigError
from qed_lightning.data.records import ProofProblem
from qed_lightning.metrics import Max, Phase, StepPhases
from qed_lightning.modules.base import QEDModule
from qed_lightning.modules.groups import (
    Groups,
    fill_step,
    has_signal,
    keep_rollouts,
    reduce_over_ranks,
    report_progress,
    shape_rewards,
    split_spares,
    step_metrics,
)
from qed_lightning.modules.policy_update import PolicyUpdate
from qed_lightning.modules.rl_checks import argument_problems, check_context, check_spares
from qed_lightning.parallel.distributed import StepRendezvous, StepWaitTimeout, end_launched_ranks
from qed_lightning.report.records import RolloutLog
from qed_lightning.rewards import GradeRequest, RubricJudge
from qed_lightning.rewards.terms import RewardTerm, RewardTerms
from qed_lightning.rl import group_advantages_masked, policy_loss
from qed_lightning.rl.microbatch import pad_values
from qed_lightning.rl.objective import ISCorrection
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.rollout.callbacks import WeightSyncCallback
from qed_lightning.seeds import derive_seed

log = logging.getLogger(__name__)


class RubricRLModule(QEDModule):
    """Rubric-reward GRPO (stage 2). See the module docstring for the algorithm; `QEDModule`'s arguments
    (`model_name_or_path`, `optimizer`, `lr_scheduler`, `dtype`, ...) pass through `**kwargs`.

    Args:
        model_name_or_path: hub id or local folder of the policy; also the data's tokenizer (linked).
        engine: rollout engine component (`VLLMEngine`, `HFEngine`, `VLLMServerEngine`, ...).
        judge: reward component, a `RubricJudge` with any judge client.
        group_size: rollouts per prompt (G); the advantage is a reward minus its group's mean.
        temperature: sampling temperature; the trainer divides its logits by the same T.
        top_p: nucleus sampling (1.0 = off; other values bias the importance ratio).
        top_k: top-k sampling (-1 = off; other values bias the importance ratio).
        max_new_tokens: completion budget per rollout.
        micro_batch_tokens: token budget of one forward/backward pass.
        micro_batch_layout: how a micro-batch goes through the model (rl/microbatch.py): "packed" (one row, varlen
            flash attention), "padded" (right-padded rows), "shared_prefix" (each prompt once, its G completions
            attending to its cached keys/values); "auto" = packed with flash attention, else shared_prefix, or
            padded under gradient checkpointing. All give the same gradient.
        logits_chunk_tokens: completion tokens per LM-head chunk: log-probs and entropies come from the hidden
            states a chunk at a time under checkpointing, never as `[n, T, V]` logits; 0 = all logits at once.
        clip_low: lower ratio clip: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        clip_high: upper ratio clip: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        entropy_coef: weight of the entropy bonus.
        kl_coef: k3 KL weight against the frozen initial policy (0 = no reference model is loaded).
        aggregation: loss aggregation: "seq_sum_over_batch" (paper), "token_mean" (DAPO), "seq_mean_token_mean"
            (GRPO) or "dr_grpo".
        advantage_scale: "none" (paper: r - mean) or "std" (divided by the group's std).
        grad_clip: max norm of the exact step gradient (of -(1/B) sum L; 0 = off, the default). The reference's 0.3
            clips DeepSpeed's gradient, divided by its accumulation count and averaged over ranks: 19.2 here for
            stage 2 and 76.8 for stage 3 (derivation in configs/rl.yaml); 0.3 here would clip 64x tighter.
        is_correction: importance-sampling correction of the sampler/trainer gap: "none" (paper), "tis" (a token's
            weight is min(rho, is_cap)) or "mask" (tokens with rho outside [1/is_cap, is_cap] leave the objective).
        is_cap: the cap of `is_correction` (> 1).
        sync_interval: optimizer steps between weight pushes to the engine.
        max_nonfinite_steps: consecutive steps with a non-finite loss/gradient (skipped) before the run aborts.
        step_wait_timeout_s: the longest a rank waits for the others before a step's first collective (they may
            still be generating or grading), checked outside the collectives (`parallel.distributed.StepRendezvous`);
            past it the run stops naming the slow ranks and their phase. Default 3 h: a paper-scale step's worst
            case is ~2 h (docs/scaling.md, "Timeouts"). 0 = no bound (the strategy's collective timeout alone).
        val_samples: rollouts per problem in the validation pass.
        seed: sampling seed base (each prompt's seed is derived from it, the step and the problem).
        skip_flat_groups: dynamic sampling (DAPO): train only on groups whose rewards differ, refilling the step
            from the batch's spares (`data.spare_prompts_per_step`, which bounds the extra generations).
        overlong_buffer: DAPO's soft overlong penalty: the reward falls linearly by up to `overlong_penalty` over
            the last `overlong_buffer` tokens of `max_new_tokens` (0 = off).
        overlong_penalty: the most the soft overlong penalty takes off a reward.
        mask_truncated: leave completions that hit `max_new_tokens` out of the loss (they stay in the baseline).
        rollout_log: which rollouts each step keeps in `<run>/rollouts/step_NNNNNN.jsonl` (read by `qed-report`):
            "all", "sample:N" (N per step, a seeded draw) or "off". At paper scale "all" is ~150 MB a step.
        reward_terms: extra reward terms added to the judge's reward, each a plain function named by dotted path
            with a weight, e.g. `[{fn: my_terms.length_penalty, weight: -0.1}]`; each term's mean is logged as
            `reward/<name>` (`qed_lightning.rewards.terms`, docs/extending.md).
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
        aggregation: Literal[
            "seq_sum_over_batch", "token_mean", "seq_mean_token_mean", "dr_grpo"
        ] = "seq_sum_over_batch",
        advantage_scale: Literal["none", "std"] = "none",
        grad_clip: float = 0.0,
        is_correction: ISCorrection = "none",
        is_cap: float = 2.0,
        sync_interval: int = 1,
        max_nonfinite_steps: int = 3,
        step_wait_timeout_s: float = 10800.0,
        val_samples: int = 1,
        seed: int = 0,
        skip_flat_groups: bool = False,
        overlong_buffer: int = 0,
        overlong_penalty: float = 1.0,
        mask_truncated: bool = False,
        rollout_log: str = "all",
        reward_terms: list[RewardTerm] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(model_name_or_path, **kwargs)  # QEDModule's arguments (jsonargparse reads them through kwargs)
        problems = argument_problems(
            group_size=group_size, temperature=temperature, max_new_tokens=max_new_tokens,
            micro_batch_tokens=micro_batch_tokens, overlong_buffer=overlong_buffer, overlong_penalty=overlong_penalty,
            step_wait_timeout_s=step_wait_timeout_s, is_cap=is_cap, logits_chunk_tokens=logits_chunk_tokens,
            micro_batch_layout=micro_batch_layout, gradient_checkpointing=self.hparams.gradient_checkpointing)
        if top_p < 1.0 or top_k > 0:
            log.warning("top_p/top_k truncation changes the sampler's log-probs; the importance ratio assumes plain "
                        "temperature sampling")
        try:
            self.rollout_records = RolloutLog(rollout_log, seed)
        except ValueError as err:
            problems.append(str(err))
        try:
            # each dotted path imported now: errors at the door; None when no term is configured
            self.reward_terms = RewardTerms(reward_terms) if reward_terms else None
        except ConfigError as err:
            problems.append(str(err))
        if problems:
            raise ConfigError("; ".join(problems))
        self.engine = engine
        self.judge = judge
        self.ref_model = None
        self.automatic_optimization = False
        # steps 4-5 (micro-batch loop, clipping, optimizer step, non-finite counter): one object, see policy_update.py
        self.policy_update = PolicyUpdate(self, micro_batch_layout, micro_batch_tokens, logits_chunk_tokens,
                                          temperature, grad_clip, max_nonfinite_steps)
        # ranks meet before a step's first collective, for at most step_wait_timeout_s; each records its phase
        self.rendezvous = StepRendezvous(step_wait_timeout_s, "model.step_wait_timeout_s")
        self.phases = StepPhases([self.rendezvous])  # the step's named, timed phases (reset per step; listeners watch)
        self.last_rollouts: list[dict] = []  # the last step's kept rollout records (RolloutTable logs samples of them)

    _hparams_ignore = ("optimizer", "lr_scheduler", "engine", "judge")

    def setup(self, stage: str) -> None:
        """Errors at the door: every prompt plus the completion budget must fit the engine's context. Under DeepSpeed,
        hand `grad_clip` to DeepSpeed (this hook runs before the engine is built): ZeRO keeps gradients in its own
        partitioned buffers, so `p.grad` is None and only DeepSpeed can clip them (`policy_update`)."""
        super().setup(stage)  # strategy and precision checks
        self.policy_update.hand_grad_clip_to_deepspeed()
        limit = self.engine.max_model_len
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        check_spares(getattr(getattr(datamodule, "hparams", None), "spare_prompts_per_step", 0),
                     self.hparams.skip_flat_groups)
        check_context(limit, [*getattr(datamodule, "train_problems", []), *getattr(datamodule, "val_problems", [])],
                      self.hparams.max_new_tokens)

    def configure_callbacks(self):
        return [WeightSyncCallback(self.engine, self.hparams.sync_interval, self.phases), *self.engine.callbacks()]

    def configure_model(self) -> None:
        super().configure_model()
        if self.hparams.kl_coef > 0 and self.ref_model is None:
            from transformers import AutoModelForCausalLM

            self.ref_model = AutoModelForCausalLM.from_pretrained(
                self.hparams.model_name_or_path, dtype=self.model.dtype
            ).eval()
            self.ref_model.requires_grad_(False)

    @property
    def group_size(self) -> int:
        """Rollouts per prompt (G); part of the `RolloutHost` contract (`rollout.host`) the layouts call."""
        return self.hparams.group_size

    # -- 1. sample -----------------------------------------------------------------------------------------------

    def sampling(self, problems: list[ProofProblem], step: int | None = None) -> SamplingConfig:
        """The step's sampling settings, seeded by (seed, step, problem, and a stage-3 prompt's cycle, replay and
        repeat; `derive_seed`): reproducible across resumes and ranks, one random stream per prompt. `step` defaults
        to the current one (`AsyncRollouts` asks for the next step's settings ahead of time)."""
        hp = self.hparams
        step = self.global_step if step is None else step
        seeds = tuple(derive_seed(hp.seed, "rollout", step, p.index, p.cycle, p.replayed, p.repeat) for p in problems)
        return SamplingConfig(hp.temperature, hp.top_p, hp.top_k, hp.max_new_tokens, seeds=seeds)

    def generate_rollouts(self, problems: list[ProofProblem], n: int) -> list[Completion]:
        """`[P * n]` completions, the n of one problem adjacent."""
        groups = self.engine.generate([p.prompt_ids for p in problems], self.sampling(problems), n=n)
        return [c for group in groups for c in group]

    # -- 2. grade ------------------------------------------------------------------------------------------------

    def compute_rewards(
        self, problems: list[ProofProblem], rollouts: list[Completion]
    ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Rewards `[N]`, validity mask `[N]` (False = dropped judge failure) and the grades. Override to change
        the reward."""
        n = len(rollouts) // len(problems)
        requests = [GradeRequest(problem=problems[i // n].problem, rubric=problems[i // n].rubric, response=c.text)
                    for i, c in enumerate(rollouts)]
        grades = self.judge.grade(requests)
        rewards = torch.tensor([g.reward if g.reward is not None else 0.0 for g in grades])
        valid = torch.tensor([g.reward is not None for g in grades])
        return rewards, valid, grades

    # -- 4. loss (the objective of one micro-batch; `PolicyUpdate` runs the micro-batches and the step) -------------

    def compute_loss(self, rollouts: list[Completion], advantages: torch.Tensor, members: list[int],
                     totals: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch (`members` index `rollouts`) and its detached metrics: the clipped ratio against
        the sampler's log-probs, entropy bonus, optional k3 KL and importance-sampling correction (`rl.policy_loss`),
        normalised by the step's global counts `totals`. Override to change the objective."""
        hp = self.hparams
        update = self.policy_update
        logp, entropy, mask = update.token_stats(rollouts, members, entropy=hp.entropy_coef > 0)  # [n, T] each
        old = pad_values([r.logprobs for r in rollouts], members, mask.size(1)).to(self.device)
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref = update.token_stats(rollouts, members, self.ref_model)[0]
        loss, metrics = policy_loss(
            logp, old, advantages[members].to(self.device), mask, num_sequences=totals["sequences"],
            clip_low=hp.clip_low, clip_high=hp.clip_high, aggregation=hp.aggregation, entropy=entropy,
            entropy_coef=hp.entropy_coef, ref_logprobs=ref, kl_coef=hp.kl_coef, num_tokens=totals["tokens"],
            max_len=totals["max_len"], is_correction=hp.is_correction, is_cap=hp.is_cap,
        )
        diff = (logp.detach() - old).abs() * mask
        metrics["logprob_diff_sum"] = diff.sum()
        metrics["logprob_diff_max"] = diff.max()
        return loss, metrics

    # -- the step, as a list of named steps ----------------------------------------------------------------------

    def training_step(self, batch: list[ProofProblem], batch_idx: int) -> None:
        metrics, _ = self.rl_step(batch)
        self.log_step(metrics, len(batch))

    def sample_groups(self, problems: list[ProofProblem]) -> Groups:
        """1. sample and 2. grade `problems` (G rollouts each, in the "generate" and "grade" phases); the rewards
        carry the overlong penalty when it is on. Dynamic sampling calls this again for spare problems."""
        hp = self.hparams
        with self.phases.phase("generate", total=len(problems) * hp.group_size) as ph, self._reporting(ph):
            rollouts = self.generate_rollouts(problems, hp.group_size)
        with self.phases.phase("grade", total=len(rollouts)) as ph, self._reporting(ph):
            rewards, valid, grades = self.grade_rollouts(problems, rollouts)
        return Groups(problems, rollouts, rewards, valid, grades)

    def grade_rollouts(
        self, problems: list[ProofProblem], rollouts: list[Completion]
    ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """`compute_rewards` plus the overlong penalty when it is on: what a group is trained and filtered on (the
        stream's grading calls it in its threads)."""
        hp = self.hparams
        rewards, valid, grades = self.compute_rewards(problems, rollouts)
        if self.reward_terms is not None:  # the configured extra terms, weighted, on top of the judge's reward
            n = len(rollouts) // len(problems)
            extra = self.reward_terms.values([problems[i // n] for i in range(len(rollouts))], rollouts)
            rewards = rewards + torch.tensor(extra, dtype=rewards.dtype)
        groups = shape_rewards(Groups(problems, rollouts, rewards, valid, grades), hp.max_new_tokens,
                               hp.overlong_buffer, hp.overlong_penalty)
        return groups.rewards, valid, grades

    def rl_step(self, batch: list[ProofProblem]) -> tuple[dict[str, float], Groups]:
        """Sample, grade, advantage, loss and step on `batch` (each item one GRPO prompt: its `prompt_ids`, graded
        against its `problem` and `rubric`; spare candidates are drawn only by dynamic sampling); returns the
        metrics and the groups trained on (`Groups`: their prompts, rollouts, rewards `[P * G]`, validity, grades),
        whichever layout produced them (the streaming layout's come from its stream, not from `batch`).
        Each named step runs in a phase of `self.phases` ("generate", "grade", "train"; "wait" in the streaming
        layout), which times it."""
        hp = self.hparams
        version = self.global_step  # the weights' version now; the optimizer step below increments it
        groups, extra = self.sample_and_grade(batch)  # 1. sample + 2. grade
        try:
            # every rank here before any collective
            extra["time/step_wait_s"] = Max(self.rendezvous.wait(self.global_step))
        except StepWaitTimeout:
            end_launched_ranks(self.trainer.strategy)  # a slow rank Lightning started would go on alone
            raise
        rollouts, rewards, valid, grades = groups.rollouts, groups.rewards, groups.valid, groups.grades
        # a judge that failed too many of the step's grades (all ranks) stops the run here, before it trains on them
        extra["judge/failure_fraction"] = self.judge.check_failures(grades, self.global_step)
        with self.phases.phase("train") as progress:
            # 3. advantage
            advantages = group_advantages_masked(rewards, valid, hp.group_size, scale=hp.advantage_scale)
            self.engine.sleep()
            metrics = self.policy_update.run(rollouts, advantages, groups.loss_mask(hp.mask_truncated),  # 4. loss
                                             self.compute_loss, progress)  # + 5. step
        self.record_rollouts(groups.problems, rollouts, grades, rewards, valid, advantages, version)  # 6. records
        metrics.update(self.step_metrics(rollouts, rewards, valid, grades, version))  # 7. metrics
        metrics.update(extra)
        return metrics, groups

    def sample_and_grade(self, batch: list[ProofProblem]) -> tuple[Groups, dict[str, float]]:
        """Steps 1-2: the step's graded groups and extra metrics. Sequential layouts generate and grade `batch`'s
        prompts (`sample_groups`), refilled from its spares under dynamic sampling (`fill_step`). With a group stream
        (the asynchronous layout, `rollout.streaming`) both already ran in the background: the step takes the
        stream's first complete groups ("wait" phase: the time the trainer waited for them; dynamic sampling is its
        `accept` filter) and `batch` only paces the steps."""
        hp = self.hparams
        stream = self.engine.group_stream()
        if stream is not None:
            accept = (lambda g: has_signal(g.rewards, g.valid, hp.group_size)) if hp.skip_flat_groups else None
            with self.phases.phase("wait"):
                taken = stream.take(self.global_step, accept=accept)
            return Groups(taken.prompts, taken.rollouts, taken.rewards, taken.valid, taken.grades), taken.metrics
        prompts, spares = split_spares(batch)
        groups = self.sample_groups(prompts)
        if not hp.skip_flat_groups:
            return groups, {}
        return fill_step(groups, spares, len(prompts), hp.group_size, self.sample_groups)  # groups.py

    def stream_prompts(self, problem: ProofProblem, release: int) -> list[ProofProblem]:
        """The GRPO prompts a streamed problem becomes (stage 2: the problem itself); `release` is the step whose
        data it came with (its seeds). Runs in the stream's threads."""
        return [problem]

    def record_rollouts(self, batch: list[ProofProblem], rollouts: list[Completion], grades: list,
                        rewards: torch.Tensor, valid: torch.Tensor, advantages: torch.Tensor, version: int) -> None:
        """Keep what the step generated (`rollout_log`, see `groups.keep_rollouts`) in `<run>/rollouts/`;
        `last_rollouts` holds the kept records for `RolloutTable`."""
        self.last_rollouts = keep_rollouts(self, self.rollout_records, batch, rollouts, grades, rewards, valid,
                                           advantages, version)

    def _reporting(self, phase: Phase):
        return report_progress(self.phases, phase, self.engine, self.judge)

    def on_train_start(self) -> None:
        """A resumed run redoes the steps after its checkpoint: the rollout files the killed run wrote for them go
        (they are written again as the steps are redone), so no step is kept twice or from the abandoned run."""
        if self.trainer.is_global_zero:
            RolloutLog.forget_from(self.trainer.default_root_dir, self.global_step)

    def step_metrics(self, rollouts: list[Completion], rewards: torch.Tensor, valid: torch.Tensor, grades: list,
                     version: int) -> dict[str, float]:
        """rollout/* and judge/score_* of the whole step (every rank's rollouts, see `groups.table_metrics`), the
        judge's counters, the phase times and the step's throughput."""
        counters = [self.judge] if self.reward_terms is None else [self.judge, self.reward_terms]
        return step_metrics(rollouts, rewards, valid, grades, version, self.hparams.group_size, self.phases, counters)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.phases.reset()

    def log_step(self, metrics: dict[str, float], batch_size: int) -> None:
        """Log a step's metrics; under data parallelism, combined over ranks first as each declares
        (`qed_lightning.metrics`: `Sum(n)` for a count, `Max(x)` for a maximum or a time, a plain float is
        averaged)."""
        metrics = reduce_over_ranks(metrics)
        self.log_dict(metrics, batch_size=batch_size)
        self.log("reward", metrics["rollout/reward_mean"], prog_bar=True, logger=False, batch_size=batch_size)

    def validation_step(self, batch: list[ProofProblem], batch_idx: int) -> None:
        rollouts = self.generate_rollouts(batch, self.hparams.val_samples)
        rewards, valid, grades = self.compute_rewards(batch, rollouts)
        kept = rewards[valid]
        judge = {f"val/{k.replace('/', '_')}": v for k, v in self.judge.pop_metrics().items()}
        self.log_dict(judge, batch_size=len(batch), sync_dist=True)
        # over every rank's rollouts (each rank validates its share of the problems), not rank 0's share
        sums = torch.tensor([float(kept.sum()), kept.numel(), sum(r.truncated for r in rollouts), len(rollouts)],
                            dtype=torch.float64, device=self.device)
        kept_sum, kept_n, truncated, n = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
        # (already global: the mean over ranks of equal values is the value; said so, Lightning stops warning)
        self.log("val/reward_mean", kept_sum / max(kept_n, 1.0), batch_size=max(int(kept_n), 1), sync_dist=True)
        self.log("val/truncated_frac", truncated / max(n, 1.0), batch_size=max(int(n), 1), sync_dist=True)
