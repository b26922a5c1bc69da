"""Per-token log-probs and entropies: hand values, a direct reference, the chunked path, gradients, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from qed_lightning.model.forward import entropy_from_logits, shift_for_causal_lm, token_logprobs

LN3 = math.log(3.0)


def _reference_logprobs(logits, targets, temperature):
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def _reference_entropy(logits, temperature):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def test_logprob_and_entropy_by_hand_at_two_temperatures():
    logits = torch.tensor([[[0.0, LN3]]])  # [1, 1, 2]
    targets = torch.tensor([[1]])
    # T = 1: softmax [1/4, 3/4] -> log 0.75 = -0.28768207; H = 0.25 ln 4 + 0.75 ln(4/3) = 0.56233514
    assert_close(token_logprobs(logits, targets), torch.tensor([[-0.28768207]]))
    assert_close(entropy_from_logits(logits), torch.tensor([[0.56233514]]))
    # T = 0.5: logits / T = [0, ln 9] -> softmax [0.1, 0.9] -> log 0.9 = -0.10536052
    #          H = 0.1 ln 10 + 0.9 ln(10/9) = 0.32508297
    assert_close(token_logprobs(logits, targets, temperature=0.5), torch.tensor([[-0.10536052]]))
    assert_close(entropy_from_logits(logits, temperature=0.5), torch.tensor([[0.32508297]]))


@pytest.mark.parametrize("chunk_tokens", [None, 1, 2, 5])
def test_token_logprobs_match_log_softmax_gather_with_gradients(chunk_tokens):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 17, generator=gen)).requires_grad_()
    targets = torch.randint(0, 17, (3, 5), generator=gen)
    weights = torch.randn(3, 5, generator=gen)
    out = token_logprobs(logits, targets, 0.8, chunk_tokens=chunk_tokens)
    (out * weights).sum().backward()
    grad, logits.grad = logits.grad, None
    ref = _reference_logprobs(logits, targets, 0.8)
    (ref * weights).sum().backward()
    assert_close(out, ref)
    assert_close(grad, logits.grad)


@pytest.mark.parametrize("chunk_tokens", [None, 1, 3])
def test_entropy_matches_a_direct_computation_with_gradients(chunk_tokens):
    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(2, 4, 13, generator=gen)).requires_grad_()
    weights = torch.randn(2, 4, generator=gen)
    out = entropy_from_logits(logits, 0.8, chunk_tokens=chunk_tokens)
    (out * weights).sum().backward()
    grad, logits.grad = logits.grad, None
    ref = _reference_entropy(logits, 0.8)
    (ref * weights).sum().backward()
    assert_close(out, ref)
    assert_close(grad, logits.grad)


def test_large_vocabulary_chunked_path_matches_the_reference():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 7, 50_000, generator=gen)
    targets = torch.randint(0, 50_000, (2, 7), generator=gen)
    expected = _reference_logprobs(logits, targets, 0.8)
    assert_close(token_logprobs(logits, targets, 0.8, chunk_tokens=3), expected)  # blocks of 3, 3, 1 per row
    assert_close(token_logprobs(logits, targets, 0.8), expected)  # default block size
    assert_close(entropy_from_logits(logits, 0.8, chunk_tokens=3), _reference_entropy(logits, 0.8))


@pytest.mark.parametrize("fn", ["logprobs", "entropy"])
def test_gradcheck_in_float64(fn):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 6, (2, 3), generator=gen)
    if fn == "logprobs":
        assert torch.autograd.gradcheck(lambda x: token_logprobs(x, targets, 0.7, chunk_tokens=2), (logits,))
    else:
        assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, 0.7, chunk_tokens=2), (logits,))


def test_bf16_logits_are_computed_in_float32():
    gen = torch.Generator().manual_seed(4)
    logits = (4 * torch.randn(2, 3, 300, generator=gen)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 300, (2, 3), generator=gen)
    out = token_logprobs(logits, targets, 0.8)
    assert out.dtype == torch.float32
    # the float32 reference on the same bf16 values; a bf16 log_softmax would be off by ~1e-2
    assert_close(out, _reference_logprobs(logits.detach(), targets, 0.8), rtol=0, atol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    assert entropy_from_logits(logits, 0.8).dtype == torch.float32


def test_entropy_ignores_minus_inf_logits():
    # a banned token (-inf) has p = 0 and contributes 0 * log 0 = 0: H of [0, 0, -inf] = ln 2 = 0.69314718
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    out = entropy_from_logits(logits)
    assert_close(out, torch.tensor([[0.69314718]]))
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_shift_for_causal_lm_aligns_views():
    logits = torch.randn(2, 4, 5)
    input_ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    shifted_logits, targets = shift_for_causal_lm(logits, input_ids)
    # position t predicts token t + 1: logits [:, 0..2] against ids [:, 1..3]
    assert shifted_logits.shape == (2, 3, 5)
    assert targets.tolist() == [[2, 3, 4], [6, 7, 8]]
    assert shifted_logits.data_ptr() == logits.data_ptr()  # a view, not a copy
    with pytest.raises(ValueError, match=r"disagree: \(2, 4, 5\) vs \(2, 3\)"):
        shift_for_causal_lm(logits, input_ids[:, :3])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"targets": torch.zeros(2, 4, dtype=torch.long)}, r"targets must be \[N, T\] = \[2, 3\], got \[2, 4\]"),
        ({"targets": torch.zeros(2, 3)}, "targets must hold integer token ids, got dtype torch.float32"),
        ({"chunk_tokens": 0}, "chunk_tokens must be >= 1, got 0"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    args = {"logits": torch.zeros(2, 3, 5), "targets": torch.zeros(2, 3, dtype=torch.long)} | kwargs
    with pytest.raises(ValueError, match=match):
        token_logprobs(**args)


@pytest.mark.parametrize("fn", ["logprobs", "entropy"])
def test_backward_saves_no_float32_copy_of_the_logits(fn):
    # The point of the custom autograd functions: the graph keeps the bf16 logits themselves (no copy) plus [N, T]
    # statistics. A plain log_softmax(logits.float()) keeps two float32 [N, T, V] tensors instead.
    logits = torch.randn(2, 8, 1000).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 1000, (2, 8))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        if fn == "logprobs":
            token_logprobs(logits, targets, 0.8)
        else:
            entropy_from_logits(logits, 0.8)
    large = [s for s in saved if s.numel() >= logits.numel()]
    assert len(large) == 1 and large[0].data_ptr() == logits.data_ptr()
    assert all(s.shape == (2, 8) for s in saved if s.numel() < logits.numel())
