"""Sequence packing: several examples per row, position ids restarting at 0, no attention across examples.

Proof traces are long and ragged, so padding each to the longest wastes most of a batch. We pack examples into
rows of at most `max_length` tokens with first-fit-decreasing (deterministic), and give each example position ids
that start at 0. transformers turns restarting position ids into a block-diagonal causal mask when the attention
mask is None (sdpa/eager on CPU, varlen flash-attention on GPU), so no token attends across an example boundary.
The first token of every example carries no label, so no example is asked to predict from its neighbour.
Padding (to the longest row of a micro-batch) is its own segment with position ids from 0 and no labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qed_lightning.data.chat import IGNORE_INDEX, TokenizedExample


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins whose total length is at most `capacity` (longest examples first).

    >>> first_fit_decreasing([5, 3, 4, 2], capacity=7)
    [[0, 3], [2, 1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than the packing capacity {capacity}")
        for b, free in enumerate(space):
            if lengths[i] <= free:
                bins[b].append(i)
                space[b] -= lengths[i]
                break
        else:
            bins.append([i])
            space.append(capacity - lengths[i])
    return bins


def pack_row(examples: Sequence[TokenizedExample]) -> dict[str, list[int]]:
    """Concatenate examples into one row with restarting position ids; the first token of each has no label."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for ex in examples:
        input_ids.extend(ex.input_ids)
        labels.extend([IGNORE_INDEX, *ex.labels[1:]])
        position_ids.extend(range(len(ex.input_ids)))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_rows(rows: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows into `[B, L]` tensors; padding is a separate segment without labels."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
    }
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        out["input_ids"][b, :n] = torch.tensor(row["input_ids"])
        out["labels"][b, :n] = torch.tensor(row["labels"])
        out["position_ids"][b, :n] = torch.tensor(row["position_ids"])
        out["position_ids"][b, n:] = torch.arange(width - n)
    out["num_real_tokens"] = sum(len(r["input_ids"]) for r in rows)  # a host int: reading it never syncs a GPU
    return out
