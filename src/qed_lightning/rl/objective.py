"""The RL objective of GRPO-style training as pure tensor functions: group-relative advantages, then the clipped
policy-gradient loss (SPEC section 4). The per-token log-probs it takes come from `model/forward.py`.

## Advantages

A step samples G completions for each of P prompts; the rewards arrive as one flat vector `[P * G]` in which a
prompt's G completions are adjacent. The advantage of a completion is its reward relative to its own group.

Paper's choice (reference implementation): **mean baseline, no std scaling**: `A_i = r_i - mean_j r_j`
(`scale="none"`). Rewards are `score / 7`, so advantages already live in [-1, 1] and scaling by the std would
up-weight groups that barely disagree (a group with rewards {0, 1/7} would weigh as much as one with {0, 1}).

Alternatives offered:
- `scale="std"`: the original GRPO `(r_i - mean) / (std + eps)` with the *unbiased* std (`torch.std`'s default).
  A group of one completion has no spread: its advantage is 0, never NaN.
- `group_advantages_masked`: for `on_failure="drop"`, where a judge failure removes a sample from its group instead
  of counting it as a real 0 (the reference's behaviour, `on_failure="zero"`). The mean and std use the valid
  members only and a dropped sample gets advantage 0, so it contributes no gradient.

Groups whose rewards are all equal get all-zero advantages and carry no policy signal;
`zero_advantage_fraction` measures how much of a batch that is (a useful `rollout/` metric: when it nears 1 the
prompts are too easy or too hard for the current policy).

## The policy loss

The clipped importance-ratio objective, with four aggregation modes.

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
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AdvantageScale = Literal["none", "std"]
_SCALES = ("none", "std")


def _check_groups(rewards: Tensor, group_size: int, scale: str = "none") -> None:
    problems = []
    if rewards.dim() != 1:
        problems.append(f"rewards must be 1-D [P * G], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        problems.append(f"group_size must be >= 1, got {group_size}")
    elif rewards.numel() % group_size != 0:
        problems.append(
            f"rewards has {rewards.numel()} elements, which is not a multiple of group_size={group_size}; "
            "pass all G completions of every prompt, adjacent"
        )
    if scale not in _SCALES:
        problems.append(f"scale must be one of {_SCALES}, got {scale!r}")
    if problems:
        raise ValueError("; ".join(problems))


def _check_valid(rewards: Tensor, valid: Tensor) -> None:
    if valid.shape != rewards.shape or valid.dtype != torch.bool:
        raise ValueError(
            f"valid must be a bool tensor shaped like rewards {tuple(rewards.shape)}, "
            f"got dtype {valid.dtype} and shape {tuple(valid.shape)}"
        )


def _as_float(rewards: Tensor) -> Tensor:
    return rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())


def group_advantages(
    rewards: Tensor, group_size: int, scale: AdvantageScale = "none", eps: float = 1e-4
) -> Tensor:
    """Return `r - group mean` (`scale="none"`, paper) or `(r - mean) / (std + eps)` (`scale="std"`), `[P * G]`.

    >>> group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), group_size=2)
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    _check_groups(rewards, group_size, scale)
    grouped = _as_float(rewards).view(-1, group_size)  # [P, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [P, G]
    if scale == "std":
        # Unbiased std; with G == 1 torch.std is NaN, and a lone completion has no spread anyway.
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)  # [P, 1]
        centred = centred / (std + eps)
    return centred.reshape(-1)  # [P * G]


def group_advantages_masked(
    rewards: Tensor,
    valid: Tensor,
    group_size: int,
    scale: AdvantageScale = "none",
    eps: float = 1e-4,
) -> Tensor:
    """Like `group_advantages`, but statistics use only `valid` members and invalid samples get advantage 0.

    `valid` is a bool `[P * G]` mask; an invalid reward may hold anything, NaN included (it is never read).
    A group with fewer than two valid members has std 0, so with `scale="std"` its advantages are 0, not NaN.
    """
    _check_groups(rewards, group_size, scale)
    _check_valid(rewards, valid)
    keep = valid.view(-1, group_size)  # [P, G]
    grouped = torch.where(keep, _as_float(rewards).view(-1, group_size), 0.0)  # [P, G]
    count = keep.sum(dim=1, keepdim=True)  # [P, 1]
    mean = grouped.sum(dim=1, keepdim=True) / count.clamp(min=1)  # [P, 1]
    centred = torch.where(keep, grouped - mean, 0.0)  # [P, G]
    if scale == "std":
        var = centred.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)  # [P, 1], unbiased
        centred = centred / (var.sqrt() + eps)
    return centred.reshape(-1)  # [P * G]


def flat_groups(rewards: Tensor, group_size: int, *, valid: Tensor | None = None) -> Tensor:
    """Bool `[P]`: True for a group whose rewards are all equal (all-zero advantages, no policy signal).

    With `valid` (as in `group_advantages_masked`), only valid members are compared; a group with at most one
    valid member is flat too.

    >>> flat_groups(torch.tensor([1.0, 1.0, 0.0, 0.5, 3.0, 0.0]), group_size=2,
    ...             valid=torch.tensor([True] * 5 + [False]))
    tensor([ True, False,  True])
    """
    _check_groups(rewards, group_size)
    if valid is not None:
        _check_valid(rewards, valid)
    grouped = _as_float(rewards).view(-1, group_size)  # [P, G]
    keep = torch.ones_like(grouped, dtype=torch.bool) if valid is None else valid.view(-1, group_size)  # [P, G]
    high = torch.where(keep, grouped, -torch.inf).amax(dim=1)  # [P]
    low = torch.where(keep, grouped, torch.inf).amin(dim=1)  # [P]
    return (high == low) | (keep.sum(dim=1) <= 1)  # [P]


def zero_advantage_fraction(rewards: Tensor, group_size: int, *, valid: Tensor | None = None) -> float:
    """Fraction of groups whose rewards are all equal (`flat_groups`), hence whose advantages are all zero.

    >>> zero_advantage_fraction(torch.tensor([1.0, 1.0, 0.0, 0.5]), group_size=2)
    0.5
    """
    if rewards.numel() == 0:
        _check_groups(rewards, group_size)
        return 0.0
    flat = flat_groups(rewards, group_size, valid=valid)  # [P]
    return flat.sum().item() / flat.numel()


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
