"""The clipped policy-gradient loss of GRPO-style RL, with four aggregation modes (SPEC section 4).

Per generated token t of sequence i (all tensors `[N, T]` except the advantages `[N]`):

    rho_t = exp(logp_t - logp_old_t)
    L_t   = min(rho_t * A_i, clip(rho_t, 1 - clip_low, 1 + clip_high) * A_i) + entropy_coef * H_t - kl_coef * KL_t
    KL_t  = exp(c) - c - 1,  c = clamp(logp_ref_t - logp_t, -5, 5)        (the "k3" estimator)

`logp_old` is the *sampler's* log-prob of the token (the rollout may be up to ~1 step off-policy; rho corrects for
it), so both must use the same temperature convention (below). `L_t` is maximised; the returned loss
is its negative.

Paper's choice (reference implementation): `clip_low = clip_high = 4` (so it almost never clips), entropy bonus
`entropy_coef = 1e-4`, no KL (`kl_coef = 0`), and aggregation `"seq_sum_over_batch"`:
`loss = -(1/B) * sum_i sum_t L_t`, B = sequences in the optimizer step. It is a token *sum* over a constant, so a
long proof weighs more than a short one, and the result is the same for any micro-batch split or world size.

Alternatives (`aggregation=`):
- `"token_mean"` (DAPO): `-(sum L_t) / num_tokens`, num_tokens = masked tokens in the step.
- `"seq_mean_token_mean"` (original GRPO): each sequence's mean over its own tokens, then `-(sum) / B`.
- `"dr_grpo"` (Dr. GRPO): `-(sum L_t) / (B * max_len)`, max_len = the generation budget (defaults to T).

Every mode divides by step-level constants, so summing the micro-batch losses of an optimizer step gives exactly
the step's loss: pass the *step's* `num_sequences`, `num_tokens` and `max_len` to every micro-batch (the default
`max_len=T` is per call, so set it explicitly when micro-batches are padded to different lengths). DDP *averages*
gradients over W ranks, so there each rank passes the global count divided by W: `num_sequences` = global B / W
(the per-rank B when ranks get equal shares), `num_tokens` = all-reduced token count / W (may be fractional).

Importance-sampling correction (`is_correction=`, off in the paper): the sampler (vLLM, bf16, up to `max_lag` steps
old) and the trainer disagree on a token's log-prob, and with one optimizer step per batch rho *is* that gap
(`rollout/logprob_diff_*` measures it). The ratio clip bounds rho only where the advantage is positive: with A < 0
the surrogate `min(rho A, clip(rho) A)` keeps `rho A`, unbounded for a token the sampler found unlikely.
- `"tis"` (truncated IS, Yao et al. 2025, verl's `tis_imp_ratio_cap`): the surrogate is scaled by
  `sg(min(1, cap / rho))`, so a token's gradient weight is `min(rho, cap)` instead of rho;
- `"mask"` (masked IS): tokens with rho outside `[1 / cap, cap]` leave the objective (they still count in the
  step's token and sequence totals, so the other tokens' weights do not change).
Both report the share of affected tokens (`is_frac`); the correction scales the policy-gradient term only.

The mask is boolean in meaning (nonzero = counts). Masked positions may hold any value, inf and NaN included: they
are replaced before `exp`, so they reach neither the loss nor the gradient.

**Log-probs and entropies** (`token_logprobs`, `entropy_from_logits`), per token from logits, memory-friendly for
large vocabularies (SPEC section 4).

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
from typing import Literal

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


Aggregation = Literal["seq_sum_over_batch", "token_mean", "seq_mean_token_mean", "dr_grpo"]
AGGREGATIONS: tuple[str, ...] = ("seq_sum_over_batch", "token_mean", "seq_mean_token_mean", "dr_grpo")
ISCorrection = Literal["none", "tis", "mask"]
KL_CLAMP = 5.0


def _check_inputs(logprobs: Tensor, advantages: Tensor, others: dict[str, Tensor | None]) -> None:
    """Collect every shape problem into one ValueError."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, T], got shape {tuple(logprobs.shape)}")
    problems = [
        f"{name} must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(t.shape)}"
        for name, t in others.items()
        if t is not None and t.shape != logprobs.shape
    ]
    if advantages.shape != logprobs.shape[:1]:
        problems.append(f"advantages must be [N] = [{logprobs.shape[0]}], got {tuple(advantages.shape)}")
    if problems:
        raise ValueError("; ".join(problems))


def _check_options(
    n: int, aggregation: str, num_sequences: int, num_tokens: float | None, max_len: int | None
) -> None:
    problems = []
    if aggregation not in AGGREGATIONS:
        problems.append(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if num_sequences < max(n, 1):
        problems.append(
            f"num_sequences={num_sequences} but the micro-batch has {n} sequences; num_sequences is the number "
            "of sequences in the whole optimizer step"
        )
    if aggregation == "token_mean" and num_tokens is None:
        problems.append("aggregation='token_mean' needs num_tokens (the optimizer step's count of masked tokens)")
    if num_tokens is not None and not num_tokens > 0:
        problems.append(f"num_tokens must be > 0, got {num_tokens}")
    if max_len is not None and max_len < 1:
        problems.append(f"max_len must be >= 1, got {max_len}")
    if problems:
        raise ValueError("; ".join(problems))


def _check_coefs(entropy_coef: float, entropy: Tensor | None, kl_coef: float, ref_logprobs: Tensor | None) -> None:
    """A coefficient whose tensor is missing would silently do nothing: that is a configuration bug."""
    problems = []
    if entropy_coef != 0.0 and entropy is None:
        problems.append(f"entropy_coef={entropy_coef} but entropy is None; pass entropy or set entropy_coef=0")
    if kl_coef != 0.0 and ref_logprobs is None:
        problems.append(f"kl_coef={kl_coef} but ref_logprobs is None; pass ref_logprobs or set kl_coef=0")
    if problems:
        raise ValueError("; ".join(problems))


def _clipped_surrogate(
    log_ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Return the per-token surrogate `min(rho A, clip(rho) A)`, rho, and where the clipped term won."""
    rho = torch.exp(log_ratio)  # [N, T]
    adv = advantages.unsqueeze(1).to(rho.dtype)  # [N, 1]
    unclipped = rho * adv  # [N, T]
    clipped = torch.clamp(rho, 1.0 - clip_low, 1.0 + clip_high) * adv  # [N, T]
    return torch.minimum(unclipped, clipped), rho, clipped < unclipped


def is_weights(rho: Tensor, correction: str, cap: float) -> tuple[Tensor | None, Tensor | None]:
    """Detached per-token factor `[N, T]` applied to the surrogate and where it acts (both None: no correction).

    >>> w, hit = is_weights(torch.tensor([[0.25, 1.0, 4.0]]), "tis", 2.0)
    >>> w.tolist(), hit.tolist()
    ([[1.0, 1.0, 0.5]], [[False, False, True]])
    >>> w, hit = is_weights(torch.tensor([[0.25, 1.0, 4.0]]), "mask", 2.0)
    >>> w.tolist(), hit.tolist()
    ([[0.0, 1.0, 0.0]], [[True, False, True]])
    """
    rho = rho.detach()
    if correction == "none":
        return None, None
    if correction == "tis":
        hit = rho > cap
        return torch.where(hit, cap / rho, 1.0), hit
    if correction == "mask":
        hit = (rho > cap) | (rho < 1.0 / cap)
        return (~hit).to(rho.dtype), hit
    raise ValueError(f"is_correction must be one of none, tis, mask; got {correction!r}")


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || ref): `exp(c) - c - 1`, `c = clamp(ref - logp, -5, 5)`. `[N, T]`."""
    c = torch.clamp(ref_logprobs - logprobs, -KL_CLAMP, KL_CLAMP)  # [N, T]
    return torch.exp(c) - c - 1.0


def _aggregate(
    objective: Tensor,
    mask: Tensor,
    aggregation: str,
    num_sequences: int,
    num_tokens: float | None,
    max_len: int | None,
) -> Tensor:
    """Turn the masked per-token objective `[N, T]` (zeros off-mask) into the scalar loss to minimise."""
    total = objective.sum()
    if aggregation == "seq_sum_over_batch":
        return -total / num_sequences
    if aggregation == "token_mean":
        return -total / num_tokens
    if aggregation == "dr_grpo":
        return -total / (num_sequences * (max_len if max_len is not None else objective.shape[1]))
    per_seq = objective.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [N]; seq_mean_token_mean
    return -per_seq.sum() / num_sequences


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    num_sequences: int,
    clip_low: float = 4.0,
    clip_high: float = 4.0,
    aggregation: Aggregation = "seq_sum_over_batch",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    num_tokens: float | None = None,
    max_len: int | None = None,
    is_correction: ISCorrection = "none",
    is_cap: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Return `(loss, metrics)` for one micro-batch; see the module docstring for the formula and modes.

    A nonzero `entropy_coef` needs `entropy`, and a nonzero `kl_coef` needs `ref_logprobs` (a coefficient that
    would silently do nothing is an error). `is_correction`/`is_cap`: see the module docstring. Metrics are
    detached, over masked tokens of this micro-batch.
    """
    if is_cap <= 1.0:
        raise ValueError(f"is_cap must be > 1 (a ratio cap), got {is_cap}")
    same_shape = {"old_logprobs": old_logprobs, "mask": mask, "entropy": entropy, "ref_logprobs": ref_logprobs}
    _check_inputs(logprobs, advantages, same_shape)
    _check_options(logprobs.shape[0], aggregation, num_sequences, num_tokens, max_len)
    _check_coefs(entropy_coef, entropy, kl_coef, ref_logprobs)
    keep = mask != 0  # [N, T]
    # Zero the log-ratio off-mask *before* exp, so garbage there (inf, NaN) reaches neither loss nor gradient.
    log_ratio = torch.where(keep, logprobs - old_logprobs, 0.0)  # [N, T]
    objective, rho, clip_won = _clipped_surrogate(log_ratio, advantages, clip_low, clip_high)  # [N, T] x3
    weight, is_hit = is_weights(rho, is_correction, is_cap)  # [N, T] each
    if weight is not None:
        objective = objective * weight
    if entropy is not None and entropy_coef != 0.0:
        objective = objective + entropy_coef * entropy
    kl = None
    if ref_logprobs is not None:  # cleaned too: k3 has an exp
        kl = k3_kl(torch.where(keep, logprobs, 0.0), torch.where(keep, ref_logprobs, 0.0))  # [N, T]
        if kl_coef != 0.0:
            objective = objective - kl_coef * kl
    objective = torch.where(keep, objective, 0.0)  # [N, T]; drops padding, and its gradient with it
    loss = _aggregate(objective, keep, aggregation, num_sequences, num_tokens, max_len)
    return loss, _metrics(keep, rho, clip_won, entropy, kl, is_hit)


@torch.no_grad()
def _metrics(
    keep: Tensor, rho: Tensor, clip_won: Tensor, entropy: Tensor | None, kl: Tensor | None, is_hit: Tensor | None
) -> dict[str, Tensor]:
    """Detached means over masked tokens; 0 when the micro-batch has no masked token."""
    count = keep.sum()
    denom = count.clamp(min=1).to(rho.dtype)

    def masked_mean(x: Tensor) -> Tensor:
        return torch.where(keep, x.detach().to(rho.dtype), 0.0).sum() / denom

    metrics = {
        "clip_frac": masked_mean(clip_won.to(rho.dtype)),
        "ratio_mean": masked_mean(rho),
        "ratio_max": torch.where(keep, rho.detach(), 0.0).max() if keep.numel() else rho.new_zeros(()),
        "num_tokens": count,
    }
    if is_hit is not None:
        metrics["is_frac"] = masked_mean(is_hit.to(rho.dtype))
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy)
    if kl is not None:
        metrics["kl"] = masked_mean(kl)
    return metrics
