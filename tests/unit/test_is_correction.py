"""Importance-sampling correction of the policy loss (`is_correction`): values and gradients worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from qed_lightning.rl import policy_loss

# one sequence of 3 tokens, log-ratios ln 4, 0, ln 0.25 -> rho = [4, 1, 0.25]; A = -1 (the case the ratio clip
# leaves unbounded: min(rho A, clip(rho) A) = rho A = -rho for clip 4, range [-3, 5])
LOG_RATIOS = [[math.log(4.0), 0.0, math.log(0.25)]]
ADV = torch.tensor([-1.0])


def _loss(correction: str, cap: float = 2.0):
    old = torch.full((1, 3), -2.0)
    logp = (old + torch.tensor(LOG_RATIOS)).requires_grad_()
    loss, metrics = policy_loss(logp, old, ADV, torch.ones(1, 3), num_sequences=1, is_correction=correction, is_cap=cap)
    loss.backward()
    return loss, logp.grad, metrics


def test_no_correction_keeps_the_raw_ratio():
    # L = [-4, -1, -0.25]; loss = -(sum L) / 1 = 5.25; d loss / d logp_t = -A rho_t = rho_t = [4, 1, 0.25]
    loss, grad, metrics = _loss("none")
    assert_close(loss, torch.tensor(5.25))
    assert_close(grad, torch.tensor([[4.0, 1.0, 0.25]]))
    assert "is_frac" not in metrics


def test_tis_truncates_the_gradient_weight_at_the_cap():
    # token 0: rho 4 > cap 2 -> surrogate scaled by 2/4: value -2, gradient weight min(4, 2) = 2; others unchanged
    # loss = -(-2 - 1 - 0.25) = 3.25; grad = [2, 1, 0.25]; 1 of 3 tokens affected
    loss, grad, metrics = _loss("tis")
    assert_close(loss, torch.tensor(3.25))
    assert_close(grad, torch.tensor([[2.0, 1.0, 0.25]]))
    assert_close(metrics["is_frac"], torch.tensor(1 / 3))


def test_mask_drops_tokens_outside_the_trust_band():
    # band [1/2, 2]: token 0 (rho 4) and token 2 (rho 0.25) leave the objective; loss = -(-1) = 1; grad = [0, 1, 0]
    loss, grad, metrics = _loss("mask")
    assert_close(loss, torch.tensor(1.0))
    assert_close(grad, torch.tensor([[0.0, 1.0, 0.0]]))
    assert_close(metrics["is_frac"], torch.tensor(2 / 3))


def test_a_cap_of_at_most_one_is_refused():
    with pytest.raises(ValueError, match="is_cap must be > 1"):
        _loss("tis", cap=1.0)
