"""Dynamic sampling and the overlong options: the pure pieces with hand-worked numbers, then `RubricRLModule.rl_step`
with a scripted engine and judge (which groups are trained on, what enters the loss)."""

from __future__ import annotations

import pytest
import torch

from qed_lightning.data.records import ProofProblem
from qed_lightning.modules import RubricRLModule
from qed_lightning.modules.groups import Groups, fill_step, has_signal, shape_rewards, split_spares
from qed_lightning.rewards import Grade, RubricJudge
from qed_lightning.rl import flat_groups, soft_overlong_penalty
from qed_lightning.rollout.base import Completion, RolloutEngine

from fakes import NoClient

G = 2
# problem index -> the rewards of its G rollouts (a group with two different rewards has signal)
REWARDS = {0: [1.0, 1.0], 1: [0.0, 1.0], 2: [0.0, 0.0], 3: [0.5, 1.0], 4: [0.0, 0.0], 5: [1.0, 0.0]}


def _problems(*indices: int, spare: bool = False) -> list[ProofProblem]:
    return [ProofProblem(i, f"P{i}", "R", spare=spare) for i in indices]


def _groups(problems: list[ProofProblem], lengths: int = 3) -> Groups:
    rollouts = [Completion([1], [2] * lengths, [0.0] * lengths, "stop", f"P{p.index} #{j}")
                for p in problems for j in range(G)]
    rewards = torch.tensor([r for p in problems for r in REWARDS[p.index]])
    return Groups(problems, rollouts, rewards, torch.ones(len(rollouts), dtype=torch.bool), [None] * len(rollouts))


def test_soft_overlong_penalty_by_hand():
    # budget 100, buffer 20: no penalty up to 80 tokens, then -(L - 80) / 20 * 0.5
    got = soft_overlong_penalty(torch.tensor([50, 80, 90, 95, 100]), max_new_tokens=100, buffer=20, penalty=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.375, -0.5]))
    assert soft_overlong_penalty(torch.tensor([100]), 100, 0).tolist() == [0.0]  # off
    with pytest.raises(ValueError, match="overlong buffer"):
        soft_overlong_penalty(torch.tensor([1]), 10, 11)


def test_shape_rewards_adds_the_penalty_and_loss_mask_drops_truncated():
    groups = _groups(_problems(1), lengths=10)  # rewards [0, 1], both 10 tokens long
    shaped = shape_rewards(groups, max_new_tokens=10, buffer=4, penalty=1.0)
    assert shaped.rewards.tolist() == [-1.0, 0.0]  # 10 tokens = the budget: the full -1
    groups.rollouts[1].finish_reason = "length"
    assert groups.loss_mask(False).tolist() == [True, True] and groups.loss_mask(True).tolist() == [True, False]


def test_flat_groups_marks_equal_rewards():
    rewards = torch.tensor([r for i in range(6) for r in REWARDS[i]])
    assert flat_groups(rewards, G).tolist() == [True, False, True, False, True, False]


def test_has_signal_is_one_groups_verdict_over_its_valid_rollouts():
    assert not has_signal(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([True, True, True]), 3)
    assert has_signal(torch.tensor([0.5, 0.0, 0.5]), torch.tensor([True, True, True]), 3)
    # the differing rollout is a dropped judge failure: the valid ones are flat
    assert not has_signal(torch.tensor([0.5, 0.0, 0.5]), torch.tensor([True, False, True]), 3)


def test_fill_step_refills_from_spares_until_the_step_has_signal():
    prompts, spares = split_spares(_problems(0, 1, 2) + _problems(3, 4, 5, spare=True))
    draws: list[list[int]] = []

    def sample(problems):
        draws.append([p.index for p in problems])
        return _groups(problems)

    kept, metrics = fill_step(_groups(prompts), spares, target=3, group_size=G, sample=sample)
    # prompts 0 and 2 are flat: draw 2 spares (3 signal, 4 flat), then the 1 still missing (5 signal)
    assert draws == [[3, 4], [5]]
    assert [p.index for p in kept.problems] == [1, 3, 5]
    assert kept.rewards.tolist() == [0.0, 1.0, 0.5, 1.0, 1.0, 0.0] and not flat_groups(kept.rewards, G).any()
    assert metrics == {"rollout/groups_generated": 6.0, "rollout/groups_kept": 3.0, "rollout/rollouts_judged": 12.0,
                       "rollout/groups_short": 0.0}


def test_fill_step_is_bounded_by_the_spares_and_never_trains_on_nothing():
    kept, metrics = fill_step(_groups(_problems(0, 1, 2)), _problems(4, spare=True), 3, G, _groups)
    assert [p.index for p in kept.problems] == [1] and metrics["rollout/groups_short"] == 2.0
    flat, metrics = fill_step(_groups(_problems(0, 2)), [], 2, G, _groups)
    assert [p.index for p in flat.problems] == [0, 2] and metrics["rollout/groups_kept"] == 0.0  # all flat: as is


# -- through RubricRLModule.rl_step --------------------------------------------------------------------------------


class _Engine(RolloutEngine):
    """Completion j of a prompt is 'P<index> #j'; prompt ids are [index]; records the problems of every call."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def generate(self, prompts, sampling, n=1):
        self.calls.append([p[0] for p in prompts])
        return [[Completion(list(p), [5] * (3 + j), [0.0] * (3 + j), "length" if j == 1 else "stop", f"P{p[0]} #{j}")
                 for j in range(n)] for p in prompts]

    def load_weights(self, named_tensors) -> None:
        raise AssertionError("not in this test")


class _Judge(RubricJudge):
    """Grades rollout j of problem i with REWARDS[i][j] * 7."""

    def __init__(self) -> None:
        super().__init__(NoClient())

    def grade(self, requests):
        out = []
        for r in requests:
            i, j = (int(x) for x in r.response[1:].split(" #"))
            out.append(Grade(int(REWARDS[i][j] * 7), REWARDS[i][j], "ok"))
        return out


def _module(monkeypatch, **kwargs):
    # no model or tokenizer is loaded here, so no rollout records (they decode the prompts)
    module = RubricRLModule("unused", engine=_Engine(), judge=_Judge(), group_size=G, max_new_tokens=4,
                            rollout_log="off", **kwargs)
    trained: list = []
    monkeypatch.setattr(module.policy_update, "run",
                        lambda rollouts, adv, mask, loss_fn, progress=None: trained.append((rollouts, adv, mask)) or {})
    return module, trained


def _batch() -> list[ProofProblem]:
    return [ProofProblem(i, f"P{i}", "R", prompt_ids=[i], spare=i >= 3) for i in range(6)]


def test_rl_step_with_dynamic_sampling_trains_only_on_groups_with_variance(monkeypatch):
    module, trained = _module(monkeypatch, skip_flat_groups=True)
    metrics, groups = module.rl_step(_batch())
    rewards = groups.rewards
    assert module.engine.calls == [[0, 1, 2], [3, 4], [5]]
    ((rollouts, advantages, mask),) = trained
    assert [r.text for r in rollouts] == ["P1 #0", "P1 #1", "P3 #0", "P3 #1", "P5 #0", "P5 #1"]
    assert advantages.tolist() == [-0.5, 0.5, -0.25, 0.25, 0.5, -0.5]
    assert rewards.tolist() == [0.0, 1.0, 0.5, 1.0, 1.0, 0.0] and metrics["rollout/zero_adv_group_frac"] == 0.0
    assert (metrics["rollout/groups_generated"], metrics["rollout/groups_kept"]) == (6.0, 3.0)


def test_rl_step_without_the_options_trains_on_the_prompts_as_sampled(monkeypatch):
    module, trained = _module(monkeypatch)
    metrics, _ = module.rl_step(_batch()[:3])
    assert module.engine.calls == [[0, 1, 2]] and metrics["rollout/zero_adv_group_frac"] == pytest.approx(2 / 3)
    assert trained[0][2].tolist() == [True] * 6


def test_rl_step_overlong_options_shape_rewards_and_mask_truncated(monkeypatch):
    # rollout j has 3 + j tokens; with budget 4 and buffer 2 the ramp starts at 2 tokens: 3 -> -0.5, 4 -> -1 (x 0.5)
    module, trained = _module(monkeypatch, overlong_buffer=2, overlong_penalty=0.5, mask_truncated=True)
    rewards = module.rl_step(_batch()[1:2])[1].rewards
    assert rewards.tolist() == [0.0 - 0.25, 1.0 - 0.5]
    assert trained[0][2].tolist() == [True, False]  # rollout 1 hit the budget ("length"): out of the loss
