"""Pack RL sequences (prompt + completion) into token-budgeted micro-batches and unpack per-token values.

A micro-batch is ONE packed row: sequences laid end to end, position ids restarting at 0 for each (no attention
across sequences, see `qed_lightning.data.packing`). After the forward pass, the next-token log-probs of the row
`[L - 1]` are gathered back into a `[n, T]` grid (one line per sequence, its completion tokens only), which is the
layout `policy_loss` takes. No padding tokens ever go through the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qed_lightning.data.packing import first_fit_decreasing


@dataclass
class PackedSequences:
    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [1, L]
    gather_index: torch.Tensor  # [n, T] positions in the shifted row [L - 1] of each completion token
    mask: torch.Tensor  # [n, T] 1.0 on real completion tokens
    members: list[int]  # which sequences (indices into the step's list) this micro-batch holds


def plan_microbatches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `token_budget` tokens (a longer sequence goes alone)."""
    capacity = max(token_budget, max(lengths, default=1))
    return first_fit_decreasing(list(lengths), capacity)


def pack_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], members: list[int]) -> PackedSequences:
    """Lay out sequences `members` as one row; completion token j of sequence k is predicted at row position
    offset_k + len(prompt_k) + j - 1, which is where `gather_index` points."""
    ids: list[int] = []
    pos: list[int] = []
    index_rows: list[list[int]] = []
    for k in members:
        prompt, completion = prompts[k], completions[k]
        start = len(ids) + len(prompt) - 1  # position predicting the first completion token
        index_rows.append(list(range(start, start + len(completion))))
        ids.extend(prompt)
        ids.extend(completion)
        pos.extend(range(len(prompt) + len(completion)))
    width = max((len(r) for r in index_rows), default=0)
    gather = torch.zeros((len(members), max(width, 1)), dtype=torch.long)
    mask = torch.zeros((len(members), max(width, 1)))
    for row, idx in enumerate(index_rows):
        gather[row, : len(idx)] = torch.tensor(idx, dtype=torch.long)
        mask[row, : len(idx)] = 1.0
    return PackedSequences(torch.tensor([ids]), torch.tensor([pos]), gather, mask, list(members))


def unpack(row_values: torch.Tensor, packed: PackedSequences) -> torch.Tensor:
    """`[1, L - 1]` per-position values -> `[n, T]` per-completion-token values (0 where masked)."""
    return row_values[0][packed.gather_index.to(row_values.device)] * packed.mask.to(row_values.device)


def pad_values(values: Sequence[Sequence[float]], members: list[int], width: int) -> torch.Tensor:
    """Ragged per-token floats (e.g. sampler log-probs) of `members` -> `[n, width]`, zero padded."""
    out = torch.zeros((len(members), max(width, 1)))
    for row, k in enumerate(members):
        out[row, : len(values[k])] = torch.tensor(values[k], dtype=torch.float32)
    return out
