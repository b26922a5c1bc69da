"""Stage 3: reasoning-cache (RC) RL (SPEC 5): train the policy to improve on a summary of its own earlier attempt.

One optimizer step:
0. cache: run the RC loop (`qed_lightning.rc.ReasoningCache`) on the step's problems with the current policy and the
   step's sampling: K cycles of reason -> summarize, all problems batched per cycle, giving states s_0..s_K per
   problem (s_0 has an empty summary, s_{k+1} carries the summary of attempt k);
1. states: sample `states_per_trajectory` (m) of each trajectory's K+1 states without replacement (seeded by the
   step and the problem); optionally a share `replay_ratio` of them is drawn from a buffer of earlier steps' states;
2. sample, grade, advantage, loss, step exactly as stage 2 (`RubricRLModule.rl_step`): each state's exact reasoning
   prompt is one GRPO prompt with `group_size` (G) fresh rollouts, each graded against the ORIGINAL problem and
   rubric (never the RC prompt); per-turn reward, no credit assigned across cycles;
3. log: stage-2 metrics plus `rc/` metrics (reward per cycle index, improvement between consecutive cycles,
   summary length, empty and truncated summaries, RC loop latencies).
Sequences per step: P problems x m states x G (paper: 32 x 2 x 16 = 1,024).

Paper's choice and ours where they differ:
- Summarizer: the paper uses a separate frozen `Qwen/Qwen3-4B-Instruct-2507` (T 0.7, top_p 0.8, top_k 20, 2,048
  tokens). Ours: `summarizer` is an injected engine (a second `VLLMEngine` that never receives policy weights,
  started with `summarizer_model`), or None: the policy summarizes itself through its own engine (what the demo
  does; it needs no second model in memory).
- Trajectory turns: the paper paid to grade the trajectory's own attempts without training on them. Ours grades them
  only with `grade_trajectory_turns=True`, for the `rc/turn_reward_*` metrics; they never enter the loss.
- Replay of states from earlier steps (`replay_size`, `replay_ratio`) is our addition, off by default; the buffer
  is saved in the module's checkpoint.
- Colocated and on-policy per step by default, as stage 2 here (the paper generates asynchronously). With the
  one-node asynchronous layout (`configs/layout/one_node_async.yaml`) the RC loop runs in the generator's stream:
  each streamed problem's K cycles (`stream_prompts`) run in a background thread, and its m selected states go on
  as GRPO groups like stage-2 prompts, so the step takes complete state groups. What stays sequential: the K cycles
  of one problem (cycle k+1's prompt needs cycle k's summary); problems run side by side. Not supported there:
  replay (`replay_ratio > 0`: the buffer is trainer state read at sampling time, which the stream does ahead of the
  step) and an in-process summarizer engine (`VLLMEngine` cannot be called from the stream's threads; serve it
  with `VLLMServerEngine(sync: none)`); both are refused at start. In that layout the `rc/summary_*` metrics are
  not logged (the trajectories stay in the stream); `rc/reward_cycle_k` and `rc/improvement_k` are.
- Validation runs the test-time scaffold (`summarize_last=False`) and logs the reward of every cycle's attempt.
- What the stage-3 judge reads as the problem: the bare statement (`judge_problem="statement"`, as in stage 2), or
  the statement inside the paper's policy prompt (`"policy_prompt"`, what the reference's judge saw); which
  `</think>` ends the thinking the summarizer reads: `summary_input_split` "last" (ours) or "first" (reference).

Override points: those of `RubricRLModule` (`compute_rewards`, `compute_loss`), plus `select_states` (which states
are trained on). The RC prompts are versioned files (`reasoning_prompt`, `summary_prompt`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from typing import Literal

import torch

from qed_lightning.data.chat import POLICY_PROMPT
from qed_lightning.data.records import ProofProblem
from qed_lightning.modules.rubric_rl import RubricRLModule
from qed_lightning.rc.loop import RCState, RCTrajectory, ReasoningCache
from qed_lightning.metrics import Max, Sum
from qed_lightning.rewards import RubricJudge
from qed_lightning.rollout.base import RolloutEngine, SamplingConfig
from qed_lightning.rollout.callbacks import FrozenEngineCallback
from qed_lightning.rollout.engines.vllm_engine import SECOND_ENGINE_REFUSED
from qed_lightning.seeds import derive_sampling, derive_seed

log = logging.getLogger(__name__)


def sample_state_indices(num_states: int, m: int, rng: random.Random) -> list[int]:
    """`min(m, num_states)` distinct state indices, in increasing order.

    >>> sample_state_indices(4, 2, random.Random(0))
    [1, 3]
    >>> sample_state_indices(3, 5, random.Random(0))
    [0, 1, 2]
    """
    return sorted(rng.sample(range(num_states), min(m, num_states)))


def state_prompt(problem: ProofProblem, state: RCState, replayed: bool = False,
                 judge_problem: Literal["statement", "policy_prompt"] = "statement") -> ProofProblem:
    """One RC state as a GRPO prompt: the state's reasoning prompt, graded against the original problem and rubric
    (the judge reads the statement, or with `judge_problem="policy_prompt"` the statement inside the policy prompt).

    >>> s = state_prompt(ProofProblem(3, "Show 1 < 2.", "R", line=4), RCState(2, "I tried.", "...", [7, 8]))
    >>> (s.index, s.problem, s.prompt_ids, s.cycle, s.replayed, s.line)
    (3, 'Show 1 < 2.', [7, 8], 2, False, 4)
    >>> state_prompt(ProofProblem(3, "Show 1 < 2.", "R"), RCState(0, "", "", []), judge_problem="policy_prompt").problem
    'Generate a rigorous proof to the following question:\\n\\nShow 1 < 2.'
    """
    graded = (POLICY_PROMPT.replace("{problem}", problem.problem) if judge_problem == "policy_prompt"
              else problem.problem)
    return replace(problem, problem=graded, prompt_ids=list(state.prompt_ids), cycle=state.cycle, replayed=replayed,
                   spare=False, summary=state.summary)


def cycle_rewards(cycles: list[int], rewards: torch.Tensor, valid: torch.Tensor, group_size: int,
                  prefix: str) -> dict[str, float]:
    """Mean valid reward per cycle index (`{prefix}reward_cycle_k`) and the change from each cycle to the next that is
    present (`{prefix}improvement_k` = reward of cycle k - reward of cycle k-1). `cycles[i]` is prompt i's cycle."""
    per, ok = rewards.view(-1, group_size), valid.view(-1, group_size)  # [P, G]
    means: dict[int, float] = {}
    for k in sorted(set(cycles)):
        rows = torch.tensor([c == k for c in cycles])
        kept = per[rows][ok[rows]]
        if kept.numel():
            means[k] = float(kept.mean())
    metrics = {f"{prefix}reward_cycle_{k}": v for k, v in means.items()}
    metrics.update({f"{prefix}improvement_{k}": means[k] - means[k - 1] for k in means if k - 1 in means})
    return metrics


def summary_metrics(trajectories: list[RCTrajectory], timings: dict[str, float]) -> dict[str, float]:
    """`rc/` metrics of the summaries and the RC loop: length, empty and truncated shares, latencies, tokens."""
    outs = [s for t in trajectories for s in t.summaries if s is not None]
    later = [s for t in trajectories for s in t.states[1:]]
    n = max(len(outs), 1)
    return {
        "rc/summary_len_mean": sum(len(s.completion_ids) for s in outs) / n,
        "rc/summary_empty_frac": sum(not s.summary for s in later) / max(len(later), 1),
        "rc/summary_truncated_frac": sum(s.truncated for s in outs) / n,
        "rc/summarizer_s": Max(timings["summarize_s"]),
        "rc/reason_s": Max(timings["reason_s"]),
        "rc/trajectory_tokens_mean": sum(t.tokens for t in trajectories) / max(len(trajectories), 1),
    }


class ReasoningCacheRLModule(RubricRLModule):
    """Reasoning-cache RL (stage 3). See the module docstring for the algorithm.

    `RubricRLModule`'s arguments (`group_size`, `clip_low`, ...) pass through `**kwargs`.

    Args:
        model_name_or_path: hub id or local folder of the policy; also the data's tokenizer (linked).
        engine: rollout engine component of the policy.
        judge: reward component, a `RubricJudge`; grades against the original problem and rubric.
        cycles: RC cycles per problem (K); states s_0..s_K.
        states_per_trajectory: states trained on per trajectory (m), sampled without replacement.
        reasoning_prompt: packaged RC reasoning template name or a template path.
        summary_prompt: packaged RC summary template name or a template path.
        summarizer: a separate frozen engine for the summaries (paper: Qwen3-4B-Instruct-2507); None = the policy
            summarizes itself through `engine`.
        summarizer_model: the separate summarizer's weights and tokenizer (required with `summarizer`).
        summarizer_temperature: the summarizer's sampling temperature.
        summarizer_top_p: the summarizer's nucleus sampling.
        summarizer_top_k: the summarizer's top-k sampling.
        summarizer_max_new_tokens: the summarizer's token budget per summary.
        grade_trajectory_turns: also grade the trajectory's own attempts (logged as `rc/turn_*`, never trained on).
        replay_size: states of earlier steps kept for replay (0 = no buffer).
        replay_ratio: share of a step's trained states drawn from the buffer.
        judge_problem: what the judge reads as the problem: "statement" (ours) or "policy_prompt" (the reference).
        summary_input_split: the summarizer reads an attempt's thinking up to its "last" `</think>` (ours) or its
            "first" (the reference).
    """

    _hparams_ignore = ("optimizer", "lr_scheduler", "engine", "judge", "summarizer")

    def __init__(
        self,
        model_name_or_path: str,
        engine: RolloutEngine,
        judge: RubricJudge,
        cycles: int = 3,
        states_per_trajectory: int = 2,
        reasoning_prompt: str = "rc_reasoning_v1",
        summary_prompt: str = "rc_summary_v1",
        summarizer: RolloutEngine | None = None,
        summarizer_model: str | None = None,
        summarizer_temperature: float = 0.7,
        summarizer_top_p: float = 0.8,
        summarizer_top_k: int = 20,
        summarizer_max_new_tokens: int = 2048,
        grade_trajectory_turns: bool = False,
        replay_size: int = 0,
        replay_ratio: float = 0.0,
        judge_problem: Literal["statement", "policy_prompt"] = "statement",
        summary_input_split: Literal["last", "first"] = "last",
        **kwargs,
    ) -> None:
        super().__init__(model_name_or_path, engine, judge, **kwargs)  # stage 2's (and QEDModule's) arguments
        problems = []
        if cycles < 1:
            problems.append(f"model.cycles must be >= 1, got {cycles}")
        if states_per_trajectory < 1:
            problems.append(f"model.states_per_trajectory must be >= 1, got {states_per_trajectory}")
        if replay_size < 0 or not 0.0 <= replay_ratio < 1.0:
            problems.append(f"model.replay_size must be >= 0 and model.replay_ratio in [0, 1), got {replay_size} and "
                            f"{replay_ratio}")
        if replay_ratio > 0 and replay_size == 0:
            problems.append("model.replay_ratio > 0 needs a buffer: set model.replay_size > 0")
        if (summarizer is None) != (summarizer_model is None):
            problems.append("model.summarizer (a separate engine) and model.summarizer_model (its weights and "
                            "tokenizer, e.g. Qwen/Qwen3-4B-Instruct-2507) go together; leave both unset for the policy "
                            "to summarize itself")
        if summarizer is not None and torch.cuda.is_available() and summarizer.in_process and engine.in_process:
            problems.append(f"model.summarizer: {SECOND_ENGINE_REFUSED}")
        if problems:
            raise ValueError("; ".join(problems))
        if states_per_trajectory > cycles + 1:
            log.warning("model.states_per_trajectory=%d > cycles + 1 = %d states: every state is trained on",
                        states_per_trajectory, cycles + 1)
        sampling = SamplingConfig(summarizer_temperature, summarizer_top_p, summarizer_top_k, summarizer_max_new_tokens)
        self.rc = ReasoningCache(cycles, reasoning_prompt, summary_prompt, summarizer, summarizer_model, sampling,
                                 summary_input_split)
        self.summarizer = summarizer
        self.replay: list[dict] = []

    def configure_callbacks(self):
        callbacks = super().configure_callbacks()
        if self.summarizer is not None:
            callbacks.append(FrozenEngineCallback(self.summarizer, self.hparams.summarizer_model))
        return callbacks

    # -- 0. cache ------------------------------------------------------------------------------------------------

    def build_trajectories(self, problems: list[ProofProblem], summarize_last: bool = True,
                           step: int | None = None) -> list[RCTrajectory]:
        """Run the RC loop on `problems` with the current policy (seeded apart from the step's rollouts; `step`
        defaults to the current one)."""
        sampling = derive_sampling(self.sampling(problems, step), "rc_loop")  # apart from the step's rollouts
        return self.rc.run([p.problem for p in problems], self.engine, self.tokenizer, sampling, summarize_last)

    # -- 1. states -----------------------------------------------------------------------------------------------

    def fresh_states(self, problems: list[ProofProblem], trajectories: list[RCTrajectory],
                     step: int) -> list[ProofProblem]:
        """m states per trajectory, seeded by seed, step and problem (so whichever rank or batch position a problem
        lands on)."""
        hp = self.hparams
        return [state_prompt(p, t.states[i], judge_problem=hp.judge_problem)
                for p, t in zip(problems, trajectories, strict=True)
                for i in sample_state_indices(len(t.states), hp.states_per_trajectory,
                                              random.Random(derive_seed(hp.seed, "states", step, p.index)))]

    def select_states(self, problems: list[ProofProblem], trajectories: list[RCTrajectory]) -> list[ProofProblem]:
        """The step's GRPO prompts: `fresh_states`, a `replay_ratio` share of them swapped for states of earlier
        steps; then this step's states join the replay buffer (one buffer per rank; the checkpoint holds rank 0's)."""
        hp = self.hparams
        fresh = self.fresh_states(problems, trajectories, self.global_step)
        rng = random.Random(derive_seed(hp.seed, "replay", self.global_step, self.global_rank))
        n_replay = min(round(hp.replay_ratio * len(fresh)), len(self.replay))
        keep = sorted(rng.sample(range(len(fresh)), len(fresh) - n_replay))
        chosen = [fresh[i] for i in keep] + [self._from_replay(e) for e in rng.sample(self.replay, n_replay)]
        if hp.replay_size > 0:
            self.replay.extend(self._to_replay(p, s)
                               for p, t in zip(problems, trajectories, strict=True) for s in t.states)
            del self.replay[:-hp.replay_size]
        return chosen

    @staticmethod
    def _to_replay(problem: ProofProblem, state: RCState) -> dict:
        return {"index": problem.index, "problem": problem.problem, "rubric": problem.rubric, "source": problem.source,
                "line": problem.line, "cycle": state.cycle, "summary": state.summary, "prompt_text": state.prompt_text,
                "prompt_ids": list(state.prompt_ids)}

    def _from_replay(self, entry: dict) -> ProofProblem:
        problem = ProofProblem(entry["index"], entry["problem"], entry["rubric"], entry["source"],
                               line=entry.get("line", 0))
        state = RCState(entry["cycle"], entry["summary"], entry["prompt_text"], entry["prompt_ids"])
        return state_prompt(problem, state, replayed=True, judge_problem=self.hparams.judge_problem)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rc_replay"] = list(self.replay)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.replay = list(checkpoint.get("rc_replay", []))

    def stream_prompts(self, problem: ProofProblem, release: int) -> list[ProofProblem]:
        """The asynchronous layout's expansion of a problem: its RC loop (K cycles, in the stream's thread) and the
        m states selected from it, as GRPO prompts seeded by `release` as a sequential step's by its step."""
        trajectories = self.build_trajectories([problem], step=release)
        return self.fresh_states([problem], trajectories, release)

    def setup(self, stage: str) -> None:
        """Stage 2's checks, and the asynchronous layout's limits (see the module docstring)."""
        super().setup(stage)
        if not self.engine.streams_groups:
            return
        problems = []
        if self.hparams.replay_ratio > 0:
            problems.append("model.replay_ratio > 0 is not supported with a streaming engine (the replay buffer is "
                            "read at sampling time, which the stream does ahead of the step); set it to 0")
        if self.summarizer is not None and self.summarizer.in_process:
            problems.append("model.summarizer is an in-process VLLMEngine, which the stream's threads cannot share; "
                            "serve the summarizer with VLLMServerEngine (sync: none) or leave it unset")
        if problems:
            raise ValueError("; ".join(problems))

    # -- the step ------------------------------------------------------------------------------------------------

    def training_step(self, batch: list[ProofProblem], batch_idx: int) -> None:
        hp = self.hparams
        if self.engine.group_stream() is not None:  # the RC loop ran in the stream (stream_prompts)
            metrics, groups = self.rl_step(batch)
            states = groups.problems  # the RC states the stream's groups were trained on
            metrics.update(cycle_rewards([s.cycle for s in states], groups.rewards, groups.valid, hp.group_size, "rc/"))
            metrics["rc/states"] = Sum(len(states))
            self.log_step(metrics, len(batch))
            return
        with self.phases.phase("rc_loop"):
            trajectories = self.build_trajectories(batch)  # 0. cache
        states = self.select_states(batch, trajectories)  # 1. states
        metrics, groups = self.rl_step(states)  # 2. sample, grade, advantage, loss, step
        metrics.update(cycle_rewards([s.cycle for s in states], groups.rewards, groups.valid, hp.group_size, "rc/"))
        metrics.update(summary_metrics(trajectories, self.rc.timings))
        metrics.update({"rc/states": Sum(len(states)),  # time/rc_loop_s comes with rl_step's phase times
                        "rc/replayed_frac": sum(s.replayed for s in states) / len(states)})
        if hp.grade_trajectory_turns:
            metrics.update(self.grade_turns(batch, trajectories, "rc/turn_"))
        self.log_step(metrics, len(batch))

    def grade_turns(self, problems: list[ProofProblem], trajectories: list[RCTrajectory],
                    prefix: str) -> dict[str, float]:
        """Grade every trajectory's own attempts against the original problem (`{prefix}reward_cycle_k`), plus the
        judge counters of these grades (`{prefix}judge_*`); nothing here is trained on."""
        attempts = [a for t in trajectories for a in t.attempts]
        rewards, valid, _ = self.compute_rewards(problems, attempts)
        cycles = [k for t in trajectories for k in range(len(t.attempts))]
        metrics = cycle_rewards(cycles, rewards, valid, 1, prefix)
        metrics.update({f"{prefix}judge_{k.split('/', 1)[1]}": v for k, v in self.judge.pop_metrics().items()})
        return metrics

    def validation_step(self, batch: list[ProofProblem], batch_idx: int) -> None:
        """The test-time scaffold on held-out problems (`val_samples` runs each): reward of every cycle's attempt;
        `val/reward_mean` is the reward of the final attempt."""
        problems = [replace(p, repeat=r) for p in batch for r in range(self.hparams.val_samples)]
        trajectories = self.build_trajectories(problems, summarize_last=False)
        metrics = self.grade_turns(problems, trajectories, "val/")
        metrics["val/reward_mean"] = metrics.get(f"val/reward_cycle_{self.hparams.cycles - 1}", 0.0)
        metrics["val/truncated_frac"] = sum(t.attempts[-1].truncated for t in trajectories) / len(trajectories)
        # over ranks: every rank validates an equal share of the problems, so the mean of their means is the mean
        self.log_dict(metrics, batch_size=len(batch), sync_dist=True)
