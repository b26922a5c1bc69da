"""Variable-length ("varlen") attention: which backends run packed rows without a mask, and the sequence boundaries
they are given.

A packed row holds several sequences end to end, position ids restarting at 0 for each. sdpa/eager turn that into a
dense block-diagonal `[L, L]` mask; flash-attention-style kernels instead take the sequence boundaries
(`cu_seq_lens_q/k`, the cumulative lengths, and `max_length_q/k`) and cost each sequence only its own length squared.

Detection is by capability, not by name: transformers pairs every attention backend with a mask builder, and the
varlen kernels (flash_attention_2/3/4, and kernels-hub ones such as "kernels-community/flash-attn2", whatever their
name) are paired with `flash_attention_mask`, which builds no dense mask. `packs_without_mask` checks that pairing.

Boundaries: transformers recomputes them from `position_ids` in every layer (a `nonzero` and a device sync per layer)
unless they are passed in. We pass them: the RL packer knows each sequence's length (`rl.microbatch.pack_sequences`),
and a packed SFT batch's are read once per forward from its position ids (`segment_lengths`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def packs_without_mask(config) -> bool:
    """Whether `config`'s attention backend runs packed rows as varlen attention (no dense mask)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    impl = getattr(config, "_attn_implementation", None)
    if impl is None:
        return False
    try:
        return ALL_MASK_ATTENTION_FUNCTIONS[impl] is flash_attention_mask
    except KeyError:
        return False


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the sequences of a packed batch `[B, L]` read as one row (a sequence starts where its position id is
    0; each row starts one).

    >>> segment_lengths(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]))
    [3, 2, 2, 3]
    """
    flat = position_ids.reshape(-1).cpu()
    starts = (flat == 0).nonzero().reshape(-1).tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    ends = [*starts[1:], flat.numel()]
    return [e - s for s, e in zip(starts, ends, strict=True)]


def varlen_kwargs(lengths: Sequence[int], device: torch.device | str) -> dict:
    """The keyword arguments transformers' flash path takes instead of recomputing boundaries: cumulative lengths
    `[S + 1]` (int32) for queries and keys (the same: self-attention), and the longest sequence.

    >>> varlen_kwargs([3, 2], "cpu")["cu_seq_lens_q"].tolist()
    [0, 3, 5]
    """
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(list(lengths), dtype=torch.int32).cumsum(0)
    cu = cu.to(device)
    longest = max(lengths, default=0)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
