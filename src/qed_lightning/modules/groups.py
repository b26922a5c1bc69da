"""A step's groups, and everything the step does with them besides training on them.

`RubricRLModule.rl_step` samples G rollouts of each prompt and grades them; what it does with the graded groups
apart from the advantage and the loss is here, as plain objects and functions the module only calls: shaping and
refilling them (dynamic sampling), measuring them over every rank (the `rollout/*` metrics), and reporting and
keeping them (phase progress, rollout records).

## Shaping and refilling

- **overlong options** (DAPO; off in the paper configs): `shape_rewards` adds the soft overlong penalty
  (`rl/overlong.py`) to every reward, and `Groups.loss_mask` leaves truncated completions out of the loss;
- **dynamic sampling** (DAPO, `model.skip_flat_groups`): a group whose G rewards are all equal has zero advantage,
  so it costs generation and judging and teaches nothing. `fill_step` drops such groups and refills the step from
  the batch's spare candidates (`data.spare_prompts_per_step`), a few prompts at a time and only as many as are
  still missing, until the step holds `prompts_per_step` groups with reward variance or the spares run out. The
  spares bound the extra generations (at most `spare_prompts_per_step x G` rollouts per step), and because they
  come with the batch the data order and an exact resume do not depend on which groups came out flat.
  If no group of the step has variance, the step trains on its flat groups (a step of zero advantages, exactly
  as without dynamic sampling) so the optimizer step count never changes. Logged: `rollout/groups_generated`,
  `rollout/groups_kept`, `rollout/rollouts_judged`, `rollout/groups_short` (prompts the step still lacked).

Paper's choice: neither (every sampled group is trained on; `rollout/zero_adv_group_frac` only counts the flat
ones). DAPO's dynamic sampling keeps drawing whole batches from the loader until one is full; ours draws from a
fixed number of spares, so a step's cost is bounded and the loader advances one batch per step.

## Metrics over ranks

Under data parallelism every rank generates and grades its own prompts, so a metric computed from one rank's
rollouts describes only its share. `rollout_table` turns a rank's rollouts into a `[N, 6]` tensor; the module
gathers the ranks' tables and computes the `rollout/*` and `judge/score_*` metrics of the whole step from them
(`table_metrics`). The other metrics combine as the code that made them declares (`qed_lightning.metrics`: `Sum`
counts add up, `Max` maxima and phase times take the slowest rank, plain floats are averaged over ranks).

## Progress and records

`report_progress` forwards the rollout engine's finished completions and the judge's finished grades into the current
phase (`metrics.py`: "generate k/N", "grade k/N"), and the tokens generated and grades failed so far to the
phase listeners as `phase_stats(name, stats)` (what `QEDProgressBar` shows as tok/s and failures). `keep_rollouts`
turns a step into rollout records (`report/records.py`), gathers every rank's to rank 0 and writes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import lightning as L
import torch

from qed_lightning.data.records import ProofProblem
from qed_lightning.metrics import Phase, StepPhases, Sum, combine
from qed_lightning.parallel.distributed import gather_objects
from qed_lightning.report.records import RolloutLog, rollout_records
from qed_lightning.rewards import BaseJudge, Grade
from qed_lightning.rl import flat_groups, soft_overlong_penalty, zero_advantage_fraction
from qed_lightning.rollout.base import Completion, RolloutEngine

__all__ = ["COLUMNS", "Groups", "fill_step", "has_signal", "keep_rollouts", "reduce_over_ranks",
           "report_progress", "rollout_table", "shape_rewards", "split_spares", "step_metrics",
           "table_metrics"]


@dataclass
class Groups:
    """Graded groups of one step: G rollouts per problem, a problem's G adjacent."""

    problems: list[ProofProblem]
    rollouts: list[Completion]  # [P * G]
    rewards: torch.Tensor  # [P * G]
    valid: torch.Tensor  # [P * G] bool; False = a judge failure dropped from its group (on_failure="drop")
    grades: list

    def take(self, keep: list[int]) -> Groups:
        """The groups at indices `keep` (problem order)."""
        size = len(self.rollouts) // max(len(self.problems), 1)
        rows = [g * size + j for g in keep for j in range(size)]
        return Groups([self.problems[g] for g in keep], [self.rollouts[i] for i in rows], self.rewards[rows],
                      self.valid[rows], [self.grades[i] for i in rows])

    def join(self, other: Groups) -> Groups:
        return Groups(self.problems + other.problems, self.rollouts + other.rollouts,
                      torch.cat([self.rewards, other.rewards]), torch.cat([self.valid, other.valid]),
                      self.grades + other.grades)

    def loss_mask(self, mask_truncated: bool) -> torch.Tensor:
        """Bool `[P * G]`: the rollouts that enter the loss (valid, and not truncated under `mask_truncated`)."""
        if not mask_truncated:
            return self.valid
        return self.valid & ~torch.tensor([r.truncated for r in self.rollouts], dtype=torch.bool)


def split_spares(batch: list[ProofProblem]) -> tuple[list[ProofProblem], list[ProofProblem]]:
    """(the step's prompts, its spare candidates), each in batch order."""
    return [p for p in batch if not p.spare], [p for p in batch if p.spare]


def shape_rewards(groups: Groups, max_new_tokens: int, buffer: int, penalty: float) -> Groups:
    """Add the soft overlong penalty of each rollout's length to its reward (no change when `buffer` is 0)."""
    if buffer == 0:
        return groups
    lengths = torch.tensor([len(r.completion_ids) for r in groups.rollouts])  # [P * G]
    shaped = groups.rewards + soft_overlong_penalty(lengths, max_new_tokens, buffer, penalty).to(groups.rewards.dtype)
    return Groups(groups.problems, groups.rollouts, shaped, groups.valid, groups.grades)


def has_signal(rewards: torch.Tensor, valid: torch.Tensor, group_size: int) -> bool:
    """Whether one group's rewards `[G]` differ among its valid rollouts (the streaming layout's dynamic-sampling
    filter: a flat group is replaced by the next problem of the order, `rollout.streaming`)."""
    return not bool(flat_groups(rewards, group_size, valid=valid)[0])


def _with_signal(groups: Groups, group_size: int) -> list[int]:
    if not groups.problems:
        return []
    flat = flat_groups(groups.rewards, group_size, valid=groups.valid)  # [P]
    return [g for g in range(len(groups.problems)) if not bool(flat[g])]


def fill_step(first: Groups, spares: list[ProofProblem], target: int, group_size: int,
              sample: Callable[[list[ProofProblem]], Groups]) -> tuple[Groups, dict[str, float]]:
    """Dynamic sampling: keep `first`'s groups with reward variance and refill from `spares` (sampled with
    `sample`) until `target` groups have variance or the spares run out; see the module docstring."""
    kept = first.take(_with_signal(first, group_size))
    generated, judged, pool = len(first.problems), len(first.rollouts), list(spares)
    while len(kept.problems) < target and pool:
        missing = target - len(kept.problems)
        draw, pool = pool[:missing], pool[missing:]
        more = sample(draw)
        generated, judged = generated + len(draw), judged + len(more.rollouts)
        kept = kept.join(more.take(_with_signal(more, group_size)))
    chosen = kept if kept.problems else first  # never more than `target`: each draw fills at most what is missing
    metrics = {"rollout/groups_generated": Sum(generated), "rollout/groups_kept": Sum(len(kept.problems)),
               "rollout/rollouts_judged": Sum(judged), "rollout/groups_short": Sum(max(target - len(kept.problems), 0))}
    return chosen, metrics


# -- metrics over ranks

#: columns of `rollout_table`
COLUMNS = ("reward", "valid", "length", "truncated", "policy_version", "score")


def rollout_table(rollouts: Sequence[Completion], rewards: torch.Tensor, valid: torch.Tensor,
                  grades: Sequence | None = None) -> torch.Tensor:
    """One row per rollout, `COLUMNS` in order (score -1 = no score: a failed or missing grade), float64."""
    scores = [(-1 if g.score is None else g.score) for g in grades] if grades is not None else [-1] * len(rollouts)
    return torch.tensor(
        [[float(rewards[i]), float(valid[i]), len(r.completion_ids), float(r.truncated), r.policy_version, scores[i]]
         for i, r in enumerate(rollouts)], dtype=torch.float64).reshape(len(rollouts), len(COLUMNS))


def table_metrics(table: torch.Tensor, group_size: int, step: int) -> dict[str, float]:
    """`rollout/*` metrics (rewards over valid samples only) and the `judge/score_k` histogram of a step's table."""
    rewards, valid, lengths, truncated, versions, scores = table.T
    valid = valid.bool()
    kept = rewards[valid]
    graded = scores[scores >= 0]
    total = max(graded.numel(), 1)
    metrics = {
        "rollout/reward_mean": float(kept.mean()) if kept.numel() else 0.0,
        "rollout/reward_std": float(kept.std()) if kept.numel() > 1 else 0.0,
        "rollout/zero_adv_group_frac": zero_advantage_fraction(rewards, group_size, valid=valid),
        "rollout/response_len_mean": float(lengths.mean()),
        "rollout/response_len_max": float(lengths.max()),
        "rollout/truncated_frac": float(truncated.mean()),
        "rollout/dropped_frac": float((~valid).double().mean()),
        "rollout/policy_lag_max": float(step - versions.min()),
        "rollout/sequences": float(table.shape[0]),  # the step's sequences over every rank (the table is gathered)
    }
    metrics.update({f"judge/score_{k}": float((graded == k).sum()) / total for k in range(8)})
    return metrics


def step_metrics(rollouts: Sequence[Completion], rewards: torch.Tensor, valid: torch.Tensor, grades: Sequence,
                 version: int, group_size: int, phases: StepPhases, counters: Sequence) -> dict[str, float]:
    """A step's metrics: `rollout/*` and `judge/score_*` over every rank's rollouts (`table_metrics` of the gathered
    tables), each of `counters`' `pop_metrics()` (the judge's, the reward terms'), the phase times and the step's
    throughput (`train/tokens_per_sec`, summed over ranks: the job's)."""
    table = torch.cat(gather_objects(rollout_table(rollouts, rewards, valid, grades)))
    metrics = table_metrics(table, group_size, version)
    for counter in counters:
        metrics.update(counter.pop_metrics())
    metrics.update(phases.metrics())
    tokens = sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    seconds = sum(phases.seconds.get(name, 0.0) for name in ("generate", "grade", "wait", "train"))
    metrics["train/tokens_per_sec"] = Sum(tokens / max(seconds, 1e-9))
    return metrics


def reduce_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Combine every rank's metrics as each declares (`qed_lightning.metrics`: `Sum` counts, `Max` maxima and
    times, plain floats averaged; a key only some ranks have combines over those ranks)."""
    return combine(gather_objects(metrics))


# -- progress and records

FAILED = ("error", "parse_fail", "incomplete")


@contextmanager
def report_progress(phases: StepPhases, phase: Phase, engine: RolloutEngine, judge: BaseJudge) -> Iterator[None]:
    """While the block runs, the engine's and the judge's progress advances `phase` (see the module docstring)."""
    stats = {"tokens": 0, "failed": 0}

    def generated(done: int, tokens: int) -> None:
        stats["tokens"] += tokens
        phases.notify("phase_stats", phase.name, {"tokens": stats["tokens"]})
        phase.advance(done)

    def graded(grade: Grade) -> None:
        stats["failed"] += grade.status in FAILED
        phases.notify("phase_stats", phase.name, {"failed": stats["failed"]})
        phase.advance()

    engine.progress, judge.progress = generated, graded
    try:
        yield
    finally:
        engine.progress = judge.progress = None


def keep_rollouts(module: L.LightningModule, keep: RolloutLog, batch: list, rollouts: list, grades: list,
                  rewards: torch.Tensor, valid: torch.Tensor, advantages: torch.Tensor, version: int) -> list[dict]:
    """The step's kept records (`keep`: all, a seeded sample or none), every rank's, in rank order; rank 0 writes
    them atomically to `<default_root_dir>/rollouts/step_{version:06d}.jsonl`."""
    if not keep.enabled:
        return []
    records = rollout_records(batch, rollouts, grades, rewards, valid, advantages, version,
                              module.tokenizer.decode, module.judge.proof_of)
    trainer = module._trainer  # None for a module stepped outside a Trainer: the records stay in memory
    mine = keep.select(records, version, module.global_rank, trainer.world_size if trainer is not None else 1)
    kept = [r for part in gather_objects(mine) for r in part]
    if trainer is not None and trainer.is_global_zero:
        keep.write(trainer.default_root_dir, version, kept)
    return kept
