"""RL step metrics from a rollout table, and how rank-local metrics combine over ranks."""

import pytest
import torch

from qed_lightning.modules.groups import reduce_over_ranks, rollout_table, table_metrics
from qed_lightning.rewards import Grade
from qed_lightning.rollout.base import Completion


def test_table_metrics_by_hand():
    rollouts = [Completion([1], [5] * n, [0.0] * n, finish, "t", version)
                for n, finish, version in [(2, "stop", 3), (4, "length", 3), (1, "stop", 2), (3, "stop", 3)]]
    rewards = torch.tensor([0.5, 0.5, 1.0, 0.0])
    valid = torch.tensor([True, True, True, False])  # the last grade failed and was dropped
    grades = [Grade(score=s, reward=r, status=st)
              for s, r, st in [(4, 0.5, "ok"), (4, 0.5, "ok"), (7, 1.0, "ok"), (None, None, "error")]]
    m = table_metrics(rollout_table(rollouts, rewards, valid, grades), group_size=2, step=3)
    assert m["rollout/reward_mean"] == pytest.approx(2 / 3)
    assert m["rollout/reward_std"] == pytest.approx(torch.tensor([0.5, 0.5, 1.0]).std().item())
    assert m["rollout/zero_adv_group_frac"] == 1.0  # group 1 all 0.5; group 2 has one valid member
    assert (m["rollout/response_len_mean"], m["rollout/response_len_max"]) == (2.5, 4.0)
    assert (m["rollout/truncated_frac"], m["rollout/dropped_frac"], m["rollout/policy_lag_max"]) == (0.25, 0.25, 1.0)
    assert [m[f"judge/score_{k}"] for k in range(8)] == [0, 0, 0, 0, 2 / 3, 0, 0, 1 / 3]


def test_each_metric_declares_how_it_combines_over_ranks():
    from qed_lightning.modules.groups import Groups, fill_step
    from qed_lightning.metrics import Max, StepPhases, Sum, combine

    phases = StepPhases()
    with phases.phase("train"):
        pass
    assert all(type(v) is Max for v in phases.metrics().values())  # phase times: the slowest rank
    empty = Groups([], [], torch.zeros(0), torch.zeros(0, dtype=torch.bool), [])
    _, counts = fill_step(empty, [], target=2, group_size=2, sample=None)
    assert all(type(v) is Sum for v in counts.values())  # dynamic sampling's counts add up
    ranks = [{"judge/ok": Sum(3), "time/train_s": Max(2.0), "train/entropy": 0.5, "mine": 1.0},
             {"judge/ok": Sum(4), "time/train_s": Max(5.0), "train/entropy": 0.7}]
    assert combine(ranks) == {"judge/ok": 7.0, "time/train_s": 5.0, "train/entropy": pytest.approx(0.6), "mine": 1.0}
    assert all(type(v) is float for v in combine(ranks).values())  # plain floats go to the logger
    metrics = {"judge/ok": Sum(3), "train/entropy": 0.5}
    assert reduce_over_ranks(metrics) == metrics  # no process group: one rank, nothing to combine
