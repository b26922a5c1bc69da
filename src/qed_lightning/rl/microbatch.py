"""Lay out RL sequences (prompt + completion) as token-budgeted micro-batches and gather per-token values back.

Three layouts (`RubricRLModule(micro_batch_layout=...)`; "auto" picks by attention backend):
- "packed" (flash attention, GPU): ONE row, sequences end to end, position ids restarting at 0 for each (no
  attention across sequences, see `qed_lightning.data.packing`); no padding token goes through the model, and
  varlen flash attention costs each sequence only its own length squared.
- "padded" (sdpa/eager, e.g. CPU): one right-padded row per sequence. Causal attention never lets a real token see
  the padding after it, so no mask is needed; attention costs n x T^2 instead of the (sum of lengths)^2 of a dense
  block-diagonal mask over a packed row (measured ~2x faster per RL step on CPU for many short sequences).
- "shared_prefix" (sdpa/eager without gradient checkpointing): the G completions of a GRPO group share their
  prompt, and within one optimizer step so do their prompt activations. A micro-batch holds completions of ONE
  prompt: the prompt runs through the model once (`[1, Lp]`, keeping its keys/values), its cache is repeated for the
  k completions, and the completions run as `[k, T]` right-padded rows attending to it. Autograd flows through the
  cached keys/values, so the gradient is that of k separate `prompt + completion` rows (tested in float64:
  log-probs to 1e-10, gradients to float32 rounding, since Qwen3's RMSNorm computes in float32), for `Lp + k * T`
  tokens of compute instead of `k * (Lp + T)`. TRL's GRPOTrainer (the benchmark baseline) runs the prompt once per
  completion; the paper's prompts (~0.5k tokens) are short against its 49k-token proofs, so the saving is small
  there, and large where prompts are long against completions (reasoning-cache states carry a summary; short-completion
  runs). Putting several prompts in one micro-batch (right-padded prompt rows, a mask over the cache) was measured
  no faster on CPU, so a micro-batch holds one prompt. Gradient checkpointing drops the cache (transformers forces
  `use_cache=False` in checkpointed layers), so "auto" then falls back to "padded".
For "packed" and "padded", `gather_index` points, in the flattened `[B * (L - 1)]` next-token positions, at the
position predicting each completion token. `qed_lightning.model.forward.completion_logits` gathers only the real
completion positions, as a flat `[N, D]` (N = real completion tokens, in the row-major order of the `[n, T]` mask),
never the padded `[n, T_max, D]`: a ragged micro-batch (one 40k-token completion and 25 short ones) would pad every
short one to 40k (~5 GB of hidden states at 4B scale, twice with backward). Per-token results go back onto the
`[n, T]` grid (one line per sequence, the layout `policy_loss` takes) with `scatter_tokens`.
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
    lengths: list[int] | None = None  # "packed": each sequence's tokens, in row order (varlen attention boundaries)


def plan_microbatches(lengths: Sequence[int], token_budget: int, layout: str = "packed") -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `token_budget` tokens (a longer sequence goes alone).

    "packed" counts real tokens (first-fit-decreasing); "padded" counts rows x longest row, so sequences are taken
    longest first and a micro-batch closes when one more row would exceed the budget.

    >>> plan_microbatches([5, 3, 4, 2], 8, layout="padded")
    [[0], [2, 1], [3]]
    """
    if layout == "packed":
        return first_fit_decreasing(list(lengths), max(token_budget, max(lengths, default=1)))
    plan: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if plan and (len(plan[-1]) + 1) * lengths[plan[-1][0]] <= token_budget:
            plan[-1].append(i)
        else:
            plan.append([i])
    return plan


def plan_shared_prefix(prompts: Sequence[Sequence[int]], lengths: Sequence[int], members: Sequence[int],
                       token_budget: int) -> list[list[int]]:
    """Micro-batches of the "shared_prefix" layout: each holds completions (indices into the step's lists) of one
    prompt, longest first, while `len(prompt) + rows x longest completion` fits `token_budget` (one row always fits).

    >>> plan_shared_prefix([[1, 2], [1, 2], [3], [1, 2]], [4, 2, 5, 3], [0, 1, 2, 3], 10)
    [[0, 3], [1], [2]]
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for k in members:
        groups.setdefault(tuple(prompts[k]), []).append(k)
    plan: list[list[int]] = []
    for prompt, ks in groups.items():
        chunk: list[int] = []
        for k in sorted(ks, key=lambda k: (-lengths[k], k)):
            if chunk and len(prompt) + (len(chunk) + 1) * lengths[chunk[0]] > token_budget:
                plan.append(chunk)
                chunk = []
            chunk.append(k)
        plan.append(chunk)
    return plan


@dataclass
class SharedPrefixBatch:
    prompt_ids: torch.Tensor  # [1, Lp] the prompt all members share
    input_ids: torch.Tensor  # [n, T] completions, right-padded; they are also the targets
    mask: torch.Tensor  # [n, T] 1.0 on real completion tokens
    members: list[int]


def share_prefix(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], members: list[int],
                 pad_id: int = 0) -> SharedPrefixBatch:
    """Lay out `members` (which must share one prompt) as one prompt row plus right-padded completion rows."""
    prompt = list(prompts[members[0]])
    if not prompt or any(list(prompts[k]) != prompt for k in members):
        raise ValueError(f"shared_prefix micro-batch {members}: members must share one non-empty prompt")
    width = max(len(completions[k]) for k in members)
    ids = torch.full((len(members), max(width, 1)), pad_id, dtype=torch.long)
    for row, k in enumerate(members):
        ids[row, : len(completions[k])] = torch.tensor(list(completions[k]), dtype=torch.long)
    _, mask = _grid([list(range(len(completions[k]))) for k in members])
    return SharedPrefixBatch(torch.tensor([prompt], dtype=torch.long), ids, mask, list(members))


def pad_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], members: list[int],
                  pad_id: int = 0) -> PackedSequences:
    """One right-padded row per sequence (`[n, W]`, plain position ids); see the module docstring."""
    width = max(len(prompts[k]) + len(completions[k]) for k in members)
    ids = torch.full((len(members), width), pad_id, dtype=torch.long)
    index_rows = []
    for row, k in enumerate(members):
        seq = list(prompts[k]) + list(completions[k])
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        start = row * (width - 1) + len(prompts[k]) - 1
        index_rows.append(list(range(start, start + len(completions[k]))))
    pos = torch.arange(width).expand(len(members), width).clone()
    gather, mask = _grid(index_rows)
    return PackedSequences(ids, pos, gather, mask, list(members))


def _grid(index_rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in index_rows), default=0)
    gather = torch.zeros((len(index_rows), max(width, 1)), dtype=torch.long)
    mask = torch.zeros((len(index_rows), max(width, 1)))
    for row, idx in enumerate(index_rows):
        gather[row, : len(idx)] = torch.tensor(idx, dtype=torch.long)
        mask[row, : len(idx)] = 1.0
    return gather, mask


def pack_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                   members: list[int]) -> PackedSequences:
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
    gather, mask = _grid(index_rows)
    lengths = [len(prompts[k]) + len(completions[k]) for k in members]
    return PackedSequences(torch.tensor([ids]), torch.tensor([pos]), gather, mask, list(members), lengths)


def unpack(row_values: torch.Tensor, packed: PackedSequences) -> torch.Tensor:
    """`[B, L - 1]` per-position values -> `[n, T]` per-completion-token values (0 where masked)."""
    return row_values.reshape(-1)[packed.gather_index.to(row_values.device)] * packed.mask.to(row_values.device)


def scatter_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values `[N]` (row-major order of the real positions of `mask`) -> `[n, T]`, 0 where masked;
    differentiable in `values`.

    >>> scatter_tokens(torch.tensor([1., 2., 3.]), torch.tensor([[1., 1.], [1., 0.]])).tolist()
    [[1.0, 2.0], [3.0, 0.0]]
    """
    where = mask.reshape(-1).nonzero().squeeze(1).to(values.device)
    out = values.new_zeros(mask.numel())
    return out.index_put((where,), values).reshape(mask.shape)


def pad_values(values: Sequence[Sequence[float]], members: list[int], width: int) -> torch.Tensor:
    """Ragged per-token floats (e.g. sampler log-probs) of `members` -> `[n, width]`, zero padded."""
    out = torch.zeros((len(members), max(width, 1)))
    for row, k in enumerate(members):
        out[row, : len(values[k])] = torch.tensor(values[k], dtype=torch.float32)
    return out
