"""Group-relative advantages, with expected values worked out by hand next to each assertion."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from qed_lightning.rl import group_advantages, group_advantages_masked, zero_advantage_fraction


def test_mean_baseline_is_the_paper_default():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    # group 0: mean 0.5 -> [1 - 0.5, 0 - 0.5] = [0.5, -0.5]; group 1: mean 0.5 -> [0, 0]
    assert_close(group_advantages(rewards, group_size=2), torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_groups_are_adjacent_not_strided():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    # G=3: groups [1, 0, 0] (mean 1/3) and [0, 1, 1] (mean 2/3)
    # -> [2/3, -1/3, -1/3, -2/3, 1/3, 1/3]; a strided grouping ([1,0,1], [0,0,1]) would give other numbers
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])
    assert_close(group_advantages(rewards, group_size=3), expected)


def test_std_scaling_uses_the_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # mean 0.25; deviations [0.75, -0.25, -0.25, -0.25]
    # unbiased var = (0.5625 + 3 * 0.0625) / (4 - 1) = 0.75 / 3 = 0.25 -> std 0.5
    # A = dev / (0.5 + 1e-4) = [0.75 / 0.5001, -0.25 / 0.5001] = [1.49970006, -0.49990002]
    # (the biased std sqrt(0.1875) = 0.4330 would give 1.7317 instead)
    expected = torch.tensor([1.49970006, -0.49990002, -0.49990002, -0.49990002])
    assert_close(group_advantages(rewards, group_size=4, scale="std"), expected)


def test_std_scaling_of_a_constant_group_is_zero():
    rewards = torch.tensor([0.5, 0.5, 1.0, 0.0])
    # group 0: deviations 0, std 0 -> 0 / (0 + 1e-4) = 0
    # group 1: mean 0.5, unbiased var (0.25 + 0.25) / 1 = 0.5, std 0.70710678 -> +-0.5 / 0.70720678 = +-0.70700680
    expected = torch.tensor([0.0, 0.0, 0.70700680, -0.70700680])
    assert_close(group_advantages(rewards, group_size=2, scale="std"), expected)


@pytest.mark.parametrize("scale", ["none", "std"])
def test_group_of_one_has_zero_advantage_and_no_nan(scale):
    # each completion is its own group: r - mean = 0; torch.std of one element would be NaN
    out = group_advantages(torch.tensor([0.3, 1.0]), group_size=1, scale=scale)
    assert_close(out, torch.tensor([0.0, 0.0]))


def test_integer_rewards_are_accepted():
    # raw judge scores 0..7: group [7, 0] has mean 3.5 -> [3.5, -3.5]
    assert_close(group_advantages(torch.tensor([7, 0]), group_size=2), torch.tensor([3.5, -3.5]))


@pytest.mark.parametrize(
    ("numel", "group_size", "scale", "match"),
    [
        (5, 2, "none", "5 elements, which is not a multiple of group_size=2"),
        (4, 0, "none", "group_size must be >= 1, got 0"),
        (4, 2, "zscore", "scale must be one of .*'zscore'"),
    ],
)
def test_bad_arguments_raise_clear_errors(numel, group_size, scale, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.zeros(numel), group_size=group_size, scale=scale)


def test_two_dimensional_rewards_are_rejected():
    with pytest.raises(ValueError, match=r"rewards must be 1-D \[P \* G\], got shape \(2, 2\)"):
        group_advantages(torch.zeros(2, 2), group_size=2)


def test_masked_mean_uses_valid_members_only():
    rewards = torch.tensor([1.0, 0.0, float("nan"), 0.2, 0.4, 0.9])
    valid = torch.tensor([True, True, False, True, True, True])
    # group 0: valid [1, 0], mean 0.5 -> [0.5, -0.5], the dropped (NaN) sample -> 0
    # group 1: all valid, mean 1.5 / 3 = 0.5 -> [-0.3, -0.1, 0.4]
    expected = torch.tensor([0.5, -0.5, 0.0, -0.3, -0.1, 0.4])
    assert_close(group_advantages_masked(rewards, valid, group_size=3), expected)


def test_masked_std_uses_valid_members_only():
    rewards = torch.tensor([1.0, 0.0, 5.0, 0.7, 9.0, 9.0])
    valid = torch.tensor([True, True, False, True, False, False])
    # group 0: valid [1, 0], mean 0.5, unbiased var (0.25 + 0.25) / (2 - 1) = 0.5, std 0.70710678
    #          -> +-0.5 / (0.70710678 + 1e-4) = +-0.70700680; dropped -> 0
    # group 1: one valid member: deviation 0, std 0 (not NaN) -> 0; dropped -> 0
    expected = torch.tensor([0.70700680, -0.70700680, 0.0, 0.0, 0.0, 0.0])
    out = group_advantages_masked(rewards, valid, group_size=3, scale="std")
    assert_close(out, expected)


@pytest.mark.parametrize("scale", ["none", "std"])
def test_masked_with_all_valid_matches_unmasked(scale):
    rewards = torch.tensor([0.1, 0.9, 0.3, 0.0, 1.0, 1.0, 0.5, 0.25])
    valid = torch.ones(8, dtype=torch.bool)
    assert_close(
        group_advantages_masked(rewards, valid, group_size=4, scale=scale),
        group_advantages(rewards, group_size=4, scale=scale),
    )


def test_masked_group_with_no_valid_member_is_zero():
    valid = torch.tensor([False, False])
    # no valid member: count clamped to 1, every advantage is forced to 0 (no NaN from 0 / 0)
    out = group_advantages_masked(torch.tensor([1.0, 0.0]), valid, group_size=2, scale="std")
    assert_close(out, torch.tensor([0.0, 0.0]))


def test_masked_rejects_a_non_bool_mask():
    with pytest.raises(ValueError, match="valid must be a bool tensor .* got dtype torch.float32"):
        group_advantages_masked(torch.zeros(4), torch.ones(4), group_size=2)


def test_zero_advantage_fraction_counts_flat_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.0, 0.0])
    # groups [1, 1] flat, [0, 0.5] not, [0, 0] flat -> 2 / 3
    assert math.isclose(zero_advantage_fraction(rewards, group_size=2), 2 / 3)


def test_zero_advantage_fraction_with_dropped_samples():
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.3, 0.0, 1.0])
    valid = torch.tensor([True, False, True, True, True, True])
    # group [1, (0 dropped)]: one valid member -> flat; [0.3, 0.3] flat; [0, 1] not -> 2 / 3
    # (without the mask the first group [1, 0] would count as informative: 1 / 3)
    assert math.isclose(zero_advantage_fraction(rewards, group_size=2, valid=valid), 2 / 3)
    assert math.isclose(zero_advantage_fraction(rewards, group_size=2), 1 / 3)


def test_zero_advantage_fraction_counts_a_fully_dropped_group_as_flat():
    valid = torch.tensor([False, False, True, True])
    # group [dropped, dropped]: no signal -> flat; [0, 1] informative -> 1 / 2
    assert zero_advantage_fraction(torch.tensor([0.0, 1.0, 0.0, 1.0]), group_size=2, valid=valid) == 0.5
