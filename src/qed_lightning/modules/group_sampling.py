"""A step's groups: sampled and graded, length-shaped, and (dynamic sampling) refilled until they carry signal.

`RubricRLModule.rl_step` samples G rollouts of each prompt and grades them; this module holds what it does with
them before the advantage, as plain objects and functions (the module only calls them):

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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qed_lightning.data.rl import ProofProblem
from qed_lightning.rl import flat_groups, soft_overlong_penalty
from qed_lightning.rollout.base import Completion

__all__ = ["Groups", "fill_step", "shape_rewards", "split_spares"]


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
    metrics = {"rollout/groups_generated": float(generated), "rollout/groups_kept": float(len(kept.problems)),
               "rollout/rollouts_judged": float(judged), "rollout/groups_short": float(max(target - len(kept.problems), 0))}
    return chosen, metrics
