"""Per-token log-probs and entropies from logits, memory-friendly for large vocabularies (SPEC section 4).

**Temperature convention.** The policy loss compares the trainer's `logp` with the sampler's `logp_old` through
`rho = exp(logp - logp_old)`, so both must describe the same distribution. The paper samples at temperature 0.8
and computes `logp` from `logits / temperature`. vLLM returns that distribution's log-probs only with
`LLM(..., logprobs_mode="processed_logprobs")`; its default `"raw_logprobs"` gives temperature-1 log-probs, which
differ by ~0.3 nats per token (measured, SPEC section 7) and would make every ratio wrong. So: run the sampler in
`processed_logprobs` mode and pass the *sampling* temperature here. (The alternative, raw log-probs with
`temperature=1.0` here, is self-consistent too but trains on a distribution the sampler never drew from.) The entropy
bonus uses the same temperature-scaled distribution.

**Memory.** Logits of a long proof are `[N, T, V]` with V ~ 150k, usually in bf16. A float32 `log_softmax` of all of
them, plus the copies autograd keeps for backward, would dwarf the model. Both functions here therefore work block
by block (one sequence, `chunk_tokens` positions at a time) in float32 (float64 stays float64), and are custom
autograd functions that save only the input logits and `[N, T]` statistics, recomputing the softmax of a block in
backward. Peak extra memory is a few float32 blocks, plus the gradient of the logits itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_CHUNK_ELEMENTS = 1 << 24  # ~64 MiB per float32 block by default


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _blocks(shape: torch.Size, chunk_tokens: int) -> Iterator[tuple[int, slice]]:
    """Yield `(row, positions)` blocks covering `[N, T]`; `logits[row, positions]` is a view, never a copy."""
    for row in range(shape[0]):
        for start in range(0, shape[1], chunk_tokens):
            yield row, slice(start, start + chunk_tokens)


def _check(logits: Tensor, temperature: float, chunk_tokens: int | None, targets: Tensor | None = None) -> int:
    problems = []
    if logits.dim() != 3:
        problems.append(f"logits must be [N, T, V], got shape {tuple(logits.shape)}")
    elif targets is not None and targets.shape != logits.shape[:2]:
        problems.append(f"targets must be [N, T] = {list(logits.shape[:2])}, got {list(targets.shape)}")
    if targets is not None and (targets.is_floating_point() or targets.is_complex()):
        problems.append(f"targets must hold integer token ids, got dtype {targets.dtype}")
    if not temperature > 0:
        problems.append(f"temperature must be > 0 (the sampling temperature), got {temperature}")
    if chunk_tokens is not None and chunk_tokens < 1:
        problems.append(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if problems:
        raise ValueError("; ".join(problems))
    return chunk_tokens or max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float, chunk: int) -> Tensor:
        dtype = _compute_dtype(logits.dtype)
        out = logits.new_empty(logits.shape[:2], dtype=dtype)  # [N, T]
        lse = torch.empty_like(out)  # [N, T]
        for row, pos in _blocks(logits.shape, chunk):
            x = logits[row, pos].to(dtype) / temperature  # [t, V]
            lse[row, pos] = torch.logsumexp(x, dim=-1)
            out[row, pos] = x.gather(-1, targets[row, pos, None].long()).squeeze(-1) - lse[row, pos]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        logits, targets, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad = torch.zeros_like(logits)  # [N, T, V]
        for row, pos in _blocks(logits.shape, ctx.chunk):
            x = logits[row, pos].to(lse.dtype) / ctx.temperature  # [t, V]
            g = grad_out[row, pos, None].to(lse.dtype)  # [t, 1]
            # d logp(y) / dx = onehot(y) - softmax(x)
            grad_x = torch.exp(x - lse[row, pos, None]).mul_(-g)  # [t, V]
            grad_x.scatter_add_(-1, targets[row, pos, None].long(), g)
            grad[row, pos] = (grad_x / ctx.temperature).to(logits.dtype)
        return grad, None, None, None


def _block_entropy(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return `(p, log p, H)` of softmax over the last dim; 0 * log 0 counts as 0 (for -inf logits)."""
    logp = torch.log_softmax(x, dim=-1)  # [t, V]
    p = logp.exp()  # [t, V]
    return p, logp, -torch.where(p > 0, p * logp, 0.0).sum(-1)


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float, chunk: int) -> Tensor:
        out = logits.new_empty(logits.shape[:2], dtype=_compute_dtype(logits.dtype))  # [N, T]
        for row, pos in _blocks(logits.shape, chunk):
            out[row, pos] = _block_entropy(logits[row, pos].to(out.dtype) / temperature)[2]
        ctx.save_for_backward(logits, out)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        logits, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad = torch.zeros_like(logits)  # [N, T, V]
        for row, pos in _blocks(logits.shape, ctx.chunk):
            p, logp, _ = _block_entropy(logits[row, pos].to(entropy.dtype) / ctx.temperature)  # [t, V] x2
            # dH / dx_j = -p_j (log p_j + H)
            grad_x = -torch.where(p > 0, p * (logp + entropy[row, pos, None]), 0.0)  # [t, V]
            grad_x = grad_x * grad_out[row, pos, None].to(entropy.dtype)
            grad[row, pos] = (grad_x / ctx.temperature).to(logits.dtype)
        return grad, None, None


def token_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, *, chunk_tokens: int | None = None
) -> Tensor:
    """Return `log_softmax(logits / temperature)` at `targets`: `[N, T, V]`, `[N, T]` -> `[N, T]`.

    Computed in float32 (float64 input stays float64) one block of `chunk_tokens` positions at a time (default:
    about 16M logits per block). Pass the *sampling* temperature; see the module docstring. Differentiable.
    """
    chunk = _check(logits, temperature, chunk_tokens, targets)
    return _TokenLogprobs.apply(logits, targets, float(temperature), chunk)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, *, chunk_tokens: int | None = None) -> Tensor:
    """Return the entropy of `softmax(logits / temperature)` per position: `[N, T, V]` -> `[N, T]`.

    Same blocking, dtype and temperature convention as `token_logprobs`. Differentiable (the entropy bonus).
    """
    chunk = _check(logits, temperature, chunk_tokens)
    return _Entropy.apply(logits, float(temperature), chunk)


def shift_for_causal_lm(logits: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Align a causal LM's outputs with the tokens they predict: `(logits[:, :-1], input_ids[:, 1:])`.

    Position t of the logits predicts token t + 1, so both results have T - 1 positions; shift any per-token
    mask of `input_ids` the same way (`mask[:, 1:]`). Both are views: nothing is copied.
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits [N, T, V] and input_ids [N, T] disagree: {tuple(logits.shape)} vs {tuple(input_ids.shape)}"
        )
    return logits[:, :-1], input_ids[:, 1:]
