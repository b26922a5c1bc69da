"""The clipped policy loss: hand-computed values per aggregation, the clip, entropy and k3 KL terms, input errors,
and the micro-batch equivalence that makes gradient accumulation exact."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from qed_lightning.model.forward import entropy_from_logits, shift_for_causal_lm, token_logprobs
from qed_lightning.rl import AGGREGATIONS, group_advantages, policy_loss

LN2 = math.log(2.0)


def _ratio_logprobs(log_ratios: list[list[float]], old: float = -1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs (with grad) and old_logprobs whose difference is `log_ratios`, old being a constant."""
    old_logprobs = torch.full((len(log_ratios), len(log_ratios[0])), old)
    logprobs = (old_logprobs + torch.tensor(log_ratios)).requires_grad_()
    return logprobs, old_logprobs


# --- one 1x2 sequence, small clip: rho, the min/clip and every aggregation by hand -------------------------------
# log-ratios [ln 2, ln 0.5] -> rho = [2, 0.5]; A = +1; clip_low = clip_high = 0.2 -> clip range [0.8, 1.2]
#   unclipped rho*A = [2, 0.5]; clipped = [1.2, 0.8]; min -> L = [1.2, 0.5]; sum L = 1.7
@pytest.mark.parametrize(
    ("aggregation", "kwargs", "expected"),
    [
        ("seq_sum_over_batch", {"num_sequences": 2}, -0.85),  # -(1.7) / 2
        ("token_mean", {"num_sequences": 2, "num_tokens": 5}, -0.34),  # -(1.7) / 5
        ("seq_mean_token_mean", {"num_sequences": 2}, -0.425),  # seq mean 1.7 / 2 = 0.85; -(0.85) / 2
        ("dr_grpo", {"num_sequences": 2, "max_len": 8}, -0.10625),  # -(1.7) / (2 * 8)
        ("dr_grpo", {"num_sequences": 2}, -0.425),  # max_len defaults to T = 2: -(1.7) / (2 * 2)
    ],
)
def test_one_sequence_by_hand(aggregation, kwargs, expected):
    logprobs, old = _ratio_logprobs([[LN2, -LN2]])
    loss, metrics = policy_loss(
        logprobs, old, torch.tensor([1.0]), torch.ones(1, 2), clip_low=0.2, clip_high=0.2,
        aggregation=aggregation, **kwargs,
    )
    assert_close(loss, torch.tensor(expected))
    assert_close(metrics["clip_frac"], torch.tensor(0.5))  # token 0 took the clipped 1.2 < 2; token 1 did not


# --- two ragged sequences, paper clip (4: no clipping here); seq 1's second token is padding ------------------------
# rho = [[2, 0.5], [1, -]]; A = [1, -2] -> L = [[2, 0.5], [-2, -]]; sum L = 0.5 over 3 tokens
@pytest.mark.parametrize(
    ("aggregation", "kwargs", "expected"),
    [
        ("seq_sum_over_batch", {"num_sequences": 4}, -0.125),  # -(0.5) / 4
        ("token_mean", {"num_sequences": 4, "num_tokens": 5}, -0.1),  # -(0.5) / 5
        # seq means: (2 + 0.5) / 2 = 1.25 and -2 / 1 = -2; sum -0.75; -(-0.75) / 4
        ("seq_mean_token_mean", {"num_sequences": 4}, 0.1875),
        ("dr_grpo", {"num_sequences": 4, "max_len": 10}, -0.0125),  # -(0.5) / (4 * 10)
    ],
)
def test_ragged_batch_by_hand(aggregation, kwargs, expected):
    logprobs, old = _ratio_logprobs([[LN2, -LN2], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, metrics = policy_loss(logprobs, old, torch.tensor([1.0, -2.0]), mask, aggregation=aggregation, **kwargs)
    assert_close(loss, torch.tensor(expected))
    assert metrics["num_tokens"].item() == 3
    assert_close(metrics["clip_frac"], torch.tensor(0.0))


def test_paper_loss_gradient_by_hand():
    logprobs, old = _ratio_logprobs([[LN2, -LN2], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = policy_loss(logprobs, old, torch.tensor([1.0, -2.0]), mask, num_sequences=4)
    loss.backward()
    # d loss / d logp_t = -(1/4) * rho_t * A (unclipped): [[-(2)(1)/4, -(0.5)(1)/4], [-(1)(-2)/4, masked 0]]
    assert_close(logprobs.grad, torch.tensor([[-0.5, -0.125], [0.5, 0.0]]))


def test_clipping_binds_on_both_sides_and_stops_the_gradient():
    # rho = [[2, 0.5], [2, 0.5]], A = [+1, -1], clip 0.2 -> range [0.8, 1.2]
    # seq 0 (A=+1): min(2, 1.2) = 1.2 (clipped), min(0.5, 0.8) = 0.5 (unclipped)
    # seq 1 (A=-1): min(-2, -1.2) = -2 (unclipped), min(-0.5, -0.8) = -0.8 (clipped)
    # sum L = 1.2 + 0.5 - 2 - 0.8 = -1.1; loss = 1.1 / 2 = 0.55; clipped tokens 2 of 4
    logprobs, old = _ratio_logprobs([[LN2, -LN2], [LN2, -LN2]])
    loss, metrics = policy_loss(
        logprobs, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), num_sequences=2, clip_low=0.2, clip_high=0.2
    )
    assert_close(loss, torch.tensor(0.55))
    assert_close(metrics["clip_frac"], torch.tensor(0.5))
    assert_close(metrics["ratio_mean"], torch.tensor(1.25))  # (2 + 0.5 + 2 + 0.5) / 4
    assert_close(metrics["ratio_max"], torch.tensor(2.0))
    loss.backward()
    # clipped tokens get no gradient; others -(1/2) * rho * A: [[0, -0.25], [-(1/2)(2)(-1) = 1, 0]]
    assert_close(logprobs.grad, torch.tensor([[0.0, -0.25], [1.0, 0.0]]))


def test_clip_low_and_clip_high_are_not_swapped():
    # clip_low 0.1, clip_high 0.3 -> range [0.9, 1.3]; two one-token sequences, each its own step (B = 1)
    # seq 0: rho 2, A=+1 -> min(2, 1.3) = 1.3 -> loss -1.3   (swapped bounds [0.7, 1.1] would give -1.1)
    # seq 1: rho 0.5, A=-1 -> min(-0.5, -0.9) = -0.9 -> loss 0.9 (swapped bounds would give 0.7)
    logprobs, old = _ratio_logprobs([[LN2], [-LN2]])
    adv = torch.tensor([1.0, -1.0])
    for row, expected in [(0, -1.3), (1, 0.9)]:
        loss, _ = policy_loss(
            logprobs[row : row + 1], old[row : row + 1], adv[row : row + 1], torch.ones(1, 1),
            num_sequences=1, clip_low=0.1, clip_high=0.3,
        )
        assert_close(loss, torch.tensor(expected))


def test_paper_clip_of_four_only_binds_above_ratio_five():
    # clip 4 -> range [-3, 5]; rho = [6, 4], A = +1 -> min(6, 5) = 5 (clipped), min(4, 4) = 4; loss -(9) / 1
    logprobs, old = _ratio_logprobs([[math.log(6.0), math.log(4.0)]])
    loss, metrics = policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2), num_sequences=1)
    assert_close(loss, torch.tensor(-9.0))
    assert_close(metrics["clip_frac"], torch.tensor(0.5))


def test_entropy_bonus_by_hand():
    # rho = 1 and A = 0, so only the bonus remains: L = 0.1 * H on masked tokens = [0.1, 0.2]; loss -(0.3) / 1
    logprobs, old = _ratio_logprobs([[0.0, 0.0, 0.0]])
    entropy = torch.tensor([[1.0, 2.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = policy_loss(
        logprobs, old, torch.zeros(1), mask, num_sequences=1, entropy=entropy, entropy_coef=0.1
    )
    assert_close(loss, torch.tensor(-0.3))
    assert_close(metrics["entropy"], torch.tensor(1.5))  # (1 + 2) / 2, the padded 7 excluded
    loss.backward()
    assert_close(entropy.grad, torch.tensor([[-0.1, -0.1, 0.0]]))  # maximising H; padding gets nothing


def test_k3_kl_penalty_by_hand():
    # logp = 0, ref = [ln 2, 10]: c = [ln 2, clamp(10, -5, 5) = 5]
    # k3 = [2 - ln 2 - 1, e^5 - 5 - 1] = [0.30685282, 142.41315910]; mean 71.36000596
    # A = 0, kl_coef 0.1: L = -0.1 * k3; sum = -14.27200119; loss = 14.27200119
    logprobs, old = _ratio_logprobs([[0.0, 0.0]], old=0.0)
    ref = torch.tensor([[LN2, 10.0]])
    loss, metrics = policy_loss(
        logprobs, old, torch.zeros(1), torch.ones(1, 2), num_sequences=1, ref_logprobs=ref, kl_coef=0.1
    )
    assert_close(loss, torch.tensor(14.27200119))
    assert_close(metrics["kl"], torch.tensor(71.36000596))
    loss.backward()
    # d k3 / d logp = -(e^c - 1) = -(2 - 1) = -1 where unclamped, 0 where clamped; loss = +0.1 * sum k3
    assert_close(logprobs.grad, torch.tensor([[-0.1, 0.0]]))


def test_kl_is_reported_but_not_added_when_kl_coef_is_zero():
    logprobs, old = _ratio_logprobs([[0.0, 0.0]], old=0.0)
    ref = torch.tensor([[LN2, 10.0]])
    loss, metrics = policy_loss(logprobs, old, torch.zeros(1), torch.ones(1, 2), num_sequences=1, ref_logprobs=ref)
    assert_close(loss, torch.tensor(0.0))  # A = 0 and no KL term
    assert_close(metrics["kl"], torch.tensor(71.36000596))


def test_garbage_on_masked_positions_reaches_neither_loss_nor_gradient():
    logprobs = torch.tensor([[-1.0, float("inf"), float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.0 - LN2, float("-inf"), 0.0]])
    mask = torch.tensor([[True, False, False]])
    entropy = torch.tensor([[0.5, float("nan"), float("inf")]])
    loss, metrics = policy_loss(
        logprobs, old, torch.tensor([3.0]), mask, num_sequences=1,
        entropy=entropy, entropy_coef=0.1, ref_logprobs=old, kl_coef=0.1,
    )
    # token 0 only: rho = 2, A = 3 -> 6; bonus 0.1 * 0.5 = 0.05; c = -ln 2 -> k3 = 0.5 + ln 2 - 1 = 0.19314718
    # L = 6 + 0.05 - 0.019314718 = 6.03068528; loss = -6.03068528
    assert_close(loss, torch.tensor(-6.03068528))
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 1:].eq(0).all()
    assert all(torch.isfinite(v).all() and not v.requires_grad for v in metrics.values())


def test_metrics_are_detached():
    logprobs, old = _ratio_logprobs([[0.1, 0.2]])
    _, metrics = policy_loss(
        logprobs, old, torch.ones(1), torch.ones(1, 2), num_sequences=1,
        entropy=torch.ones(1, 2, requires_grad=True), ref_logprobs=old,
    )
    assert set(metrics) == {"clip_frac", "ratio_mean", "ratio_max", "entropy", "kl", "num_tokens"}
    assert not any(v.requires_grad for v in metrics.values())


# --- input errors -------------------------------------------------------------------------------------------------
def _call(**overrides):
    args = dict(
        logprobs=torch.zeros(2, 3), old_logprobs=torch.zeros(2, 3), advantages=torch.zeros(2),
        mask=torch.ones(2, 3), num_sequences=2,
    )
    args.update(overrides)
    return policy_loss(**args)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"old_logprobs": torch.zeros(2, 4)}, r"old_logprobs must have the shape of logprobs \(2, 3\), got \(2, 4\)"),
        ({"advantages": torch.zeros(2, 1)}, r"advantages must be \[N\] = \[2\], got \(2, 1\)"),
        ({"logprobs": torch.zeros(6)}, r"logprobs must be \[N, T\], got shape \(6,\)"),
        ({"aggregation": "mean"}, r"aggregation must be one of .* got 'mean'"),
        ({"aggregation": "token_mean"}, r"'token_mean' needs num_tokens"),
        ({"num_sequences": 1}, r"num_sequences=1 but the micro-batch has 2 sequences"),
        ({"entropy_coef": 1e-4}, r"entropy_coef=0.0001 but entropy is None"),
        ({"kl_coef": 0.1}, r"kl_coef=0.1 but ref_logprobs is None"),
    ],
)
def test_bad_inputs_raise_errors_that_say_what_was_received(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


def test_several_shape_problems_are_reported_together():
    with pytest.raises(ValueError, match=r"mask must .* got \(2, 2\); ref_logprobs must .* got \(1, 3\)"):
        _call(mask=torch.ones(2, 2), ref_logprobs=torch.zeros(1, 3))


# --- micro-batch equivalence: one step as 8 sequences == micro-batches of 1, 3, 4 ----------------------------------
V, TEMPERATURE, N = 11, 0.7, 8
LENGTHS = [4, 9, 6, 3, 8, 5, 7, 2]  # prompt + completion tokens, right-padded
PROMPT_LENGTHS = [2, 3, 1, 2, 2, 1, 3, 1]
STEP_T = max(LENGTHS) - 1  # positions after the causal shift


class _TinyPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, 5, dtype=torch.float64)
        self.head = nn.Linear(5, V, dtype=torch.float64)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(input_ids)))  # [N, T, V]


def _step_data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (N, max(LENGTHS)), generator=gen)
    pos = torch.arange(max(LENGTHS))
    ids = torch.where(pos < torch.tensor(LENGTHS)[:, None], ids, 0)  # [N, T+1], pad id 0
    target_pos = pos[1:]  # a shifted position predicts token target_pos
    mask = (target_pos >= torch.tensor(PROMPT_LENGTHS)[:, None]) & (target_pos < torch.tensor(LENGTHS)[:, None])
    noise = lambda scale: scale * torch.randn(N, STEP_T, generator=gen, dtype=torch.float64)  # noqa: E731
    rewards = torch.rand(N, generator=gen, dtype=torch.float64)
    return {"ids": ids, "mask": mask, "old_noise": noise(0.3), "ref_noise": noise(0.5),
            "advantages": group_advantages(rewards, group_size=4, scale="std")}


def _accumulated_grads(policy, data, splits, aggregation, step_counts=True, max_len=STEP_T):
    policy.zero_grad()
    total_loss = 0.0
    for start, stop in splits:
        t = max(LENGTHS[start:stop])  # each micro-batch is trimmed to its own longest sequence
        ids = data["ids"][start:stop, :t]
        logits, targets = shift_for_causal_lm(policy(ids), ids)  # [n, t-1, V], [n, t-1]
        logp = token_logprobs(logits, targets, TEMPERATURE)  # [n, t-1]
        mask = data["mask"][start:stop, : t - 1]
        loss, _ = policy_loss(
            logp, logp.detach() + data["old_noise"][start:stop, : t - 1], data["advantages"][start:stop], mask,
            num_sequences=N if step_counts else stop - start,
            num_tokens=int(data["mask"].sum()) if step_counts else int(mask.sum()),
            max_len=max_len if step_counts else None,
            aggregation=aggregation, clip_low=0.2, clip_high=0.25,
            entropy=entropy_from_logits(logits, TEMPERATURE), entropy_coef=0.01,
            ref_logprobs=logp.detach() + data["ref_noise"][start:stop, : t - 1], kl_coef=0.05,
        )
        loss.backward()
        total_loss += loss.item()
    return total_loss, torch.cat([p.grad.flatten() for p in policy.parameters()])


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_accumulate_to_the_full_step_gradient(aggregation):
    torch.manual_seed(0)
    policy, data = _TinyPolicy(), _step_data()
    full_loss, full_grad = _accumulated_grads(policy, data, [(0, 8)], aggregation)
    micro_loss, micro_grad = _accumulated_grads(policy, data, [(0, 1), (1, 4), (4, 8)], aggregation)
    assert full_grad.norm() > 1e-3  # a real gradient, not zeros compared with zeros
    assert math.isclose(full_loss, micro_loss, rel_tol=0, abs_tol=1e-9)
    assert_close(micro_grad, full_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["seq_sum_over_batch", "token_mean", "dr_grpo"])
def test_micro_batch_counts_instead_of_step_counts_break_equivalence(aggregation):
    # The control for the test above: normalising by the micro-batch's own sequences / tokens / length is wrong.
    torch.manual_seed(0)
    policy, data = _TinyPolicy(), _step_data()
    _, full_grad = _accumulated_grads(policy, data, [(0, 8)], aggregation)
    _, micro_grad = _accumulated_grads(policy, data, [(0, 1), (1, 4), (4, 8)], aggregation, step_counts=False)
    assert (micro_grad - full_grad).abs().max() > 1e-3
