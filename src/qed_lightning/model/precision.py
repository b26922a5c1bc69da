"""Which dtype the weights live in, and why it must be float32: bf16 compute on fp32 master weights.

An optimizer step writes `w + u` into the weight. In bf16 (8 significant bits) a weight of magnitude in
[2^e, 2^(e+1)) can only take values 2^(e-7) apart, so an update smaller than half that spacing, 2^(e-8), rounds
back to `w`: the weight never moves. An AdamW update is about `lr` per element (|m / sqrt(v)| is ~1, exactly 1 at the
first step), so at the paper's RL lr of 1e-6 every bf16 weight with |w| >= 2^-11 = 4.9e-4 keeps its value, i.e. ~98%
of a matrix of std 0.02 (measured on CPU: 10 AdamW steps at lr 1e-6 changed 2% of the bf16 elements, 100% in fp32).

So the weights (and the optimizer's update) stay float32 and only the compute is bf16:
- one device / DDP: `trainer.precision: bf16-mixed` on `model.dtype: float32` (autocast);
- FSDP2: the same flags; `fully_shard` then keeps fp32 sharded parameters and gathers them in bf16 for compute,
  reducing gradients in fp32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, `fsdp2_policy`);
- DeepSpeed: `bf16-mixed` or `bf16-true` turn on DeepSpeed's bf16 mode, which keeps an fp32 master copy in its
  optimizer whatever the module's dtype.
bf16 weights without a master copy (`model.dtype: bfloat16`, or `trainer.precision: bf16-true` outside DeepSpeed)
are refused unless `model.pure_bf16: true`, which logs `lost_update_warning` with the numbers of the run.
"""

from __future__ import annotations

import math

import torch

#: trainer precisions that convert the module's weights themselves to 16 bits
HALF_WEIGHTS = ("bf16-true", "16-true")


def weights_are_half(dtype: str, precision: str | None) -> bool:
    """Whether training keeps the weights in 16 bits (no fp32 master copy), outside DeepSpeed."""
    return dtype != "float32" or str(precision) in HALF_WEIGHTS


def lost_update_threshold(update: float) -> float:
    """The smallest |w| at which a bf16 weight no longer moves by an update of magnitude `update`.

    A weight in [2^e, 2^(e+1)) rounds away updates below 2^(e-8); the first power of two 2^e with 2^(e-8) > update:
    e = floor(log2(update) + 8) + 1.

    >>> lost_update_threshold(1e-6)  # the paper's RL lr: 2^-11
    0.00048828125
    >>> lost_update_threshold(1e-5)
    0.00390625
    """
    if update <= 0:
        return 0.0
    return 2.0 ** (math.floor(math.log2(update) + 8) + 1)


def lost_update_warning(params, lr: float) -> str:
    """The warning for `pure_bf16`: from which |w| an update of ~lr rounds away, and how many of `params` (this rank's
    elements) are that large."""
    threshold = lost_update_threshold(lr)
    total = frozen = 0
    with torch.no_grad():
        for p in params:
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 DTensor: this rank's shard
            total += local.numel()
            frozen += int((local.abs() >= threshold).sum())
    share = frozen / max(total, 1)
    return (f"model.pure_bf16: the weights are trained in bf16 without an fp32 master copy. An AdamW update is about "
            f"lr = {lr:g} per element; bf16 keeps 8 significant bits, so a weight in [2^e, 2^(e+1)) rounds away any "
            f"update below 2^(e-8): every weight with |w| >= {threshold:.3g} stays unchanged, {share:.1%} of this "
            f"model's weights. Use trainer.precision=bf16-mixed with model.dtype=float32 (bf16 compute on fp32 master "
            f"weights) unless this is what you want.")


def fsdp2_policy(precision: str | None):
    """FSDP2's mixed-precision policy for a trainer precision: bf16 compute on fp32 sharded parameters, gradients
    reduced in fp32, for "bf16-mixed"; None (parameters' own dtype) otherwise."""
    if str(precision) != "bf16-mixed":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
