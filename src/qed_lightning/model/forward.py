"""The RL and SFT forward below the stage modules: the policy's outputs at the positions that carry a loss, and the
LM head applied to them a chunk at a time.

**Layouts.** For each micro-batch layout of `qed_lightning.rl.microbatch` (which plans and lays them out without
running any model):

- `shared_prefix_logits`: the "shared_prefix" layout, the prompt run once and its key/value cache repeated for the
  completions that share it;
- `completion_logits`: for "packed" and "padded" rows, only the real completion positions gathered as a flat
  `[N, D]` (never the padded `[n, T_max, D]`; see the `rl.microbatch` docstring).

**The LM head without the full logits.** Final hidden states from a model's own forward
(`final_hidden_states`), and per-token statistics computed from them a chunk of positions at a time.

At the paper's scale the logits are the largest tensor of a step: a 65,536-token RL micro-batch (or a 32k SFT row)
times a 151,936-token vocabulary is ~20 GB in bf16 before any float32 copy, softmax or gradient. Both SFT
(`chunked_lm_loss`, `SFTModule.loss_chunk_tokens`) and RL (`chunked_token_stats`,
`RubricRLModule.logits_chunk_tokens`) therefore take the decoder's hidden
states, keep the positions that carry a loss, and apply the head to `chunk` of them at a time under activation
checkpointing, so only one chunk's `[chunk, V]` logits exist at once (and again, briefly, in backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from qed_lightning.data.chat import IGNORE_INDEX
from qed_lightning.rl.losses import entropy_from_logits, token_logprobs
from qed_lightning.rl.microbatch import PackedSequences, SharedPrefixBatch

__all__ = ["chunked_lm_loss", "chunked_token_stats", "completion_logits", "final_hidden_states", "shared_prefix_logits"]


def final_hidden_states(model: torch.nn.Module, **forward_kwargs):
    """`(hidden, output)`: the decoder's final (normed) hidden states `[B, L, H]` of `model(**forward_kwargs)`, and
    the model's output (its `past_key_values` when asked for).

    The batch goes through the causal LM's own forward, so FSDP/DeepSpeed hooks on the root run as usual, with
    `logits_to_keep=1` (the head computes one position per row); a forward hook on `model.get_decoder()` hands back
    the decoder's output.
    """
    captured: list[Tensor] = []

    def keep(module, args, output) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.get_decoder().register_forward_hook(keep)
    try:
        out = model(**forward_kwargs, logits_to_keep=1)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(model).__name__}.get_decoder() did not run in the forward pass")
    return captured[-1], out


def _chunk_stats(head: torch.nn.Module, states: Tensor, targets: Tensor, temperature: float, with_entropy: bool):
    logits = head(states)[None]  # [1, c, V]
    logp = token_logprobs(logits, targets[None], temperature)[0]
    if not with_entropy:
        return logp
    return logp, entropy_from_logits(logits, temperature)[0]


def chunked_token_stats(states: Tensor, targets: Tensor, mask: Tensor, head: torch.nn.Module, temperature: float, *,
                        entropy: bool, chunk_tokens: int) -> tuple[Tensor, Tensor | None]:
    """`token_logprobs` (and `entropy_from_logits`) of `head(states)`, without the `[N, V]` logits of every token.

    states `[N, H]` (the states that predict the N real completion tokens, as `model.forward.completion_logits`
    gathers them), targets `[N]`, mask `[n, T]` (N ones, row-major). The head runs `chunk_tokens` states at a time
    under activation checkpointing. Returns `[n, T]` log-probs and `[n, T]` entropies (None unless `entropy`), 0 where
    masked, both differentiable, float32 or wider.
    """
    from qed_lightning.rl.microbatch import scatter_tokens

    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    logps, entropies = [], []
    for start in range(0, targets.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        out = checkpoint(_chunk_stats, head, states[piece], targets[piece], float(temperature), entropy,
                         use_reentrant=False)
        logps.append(out[0] if entropy else out)
        if entropy:
            entropies.append(out[1])
    dtype = torch.promote_types(states.dtype, torch.float32)

    def grid(parts: list[Tensor]) -> Tensor:
        return scatter_tokens(torch.cat(parts) if parts else states.new_zeros(0, dtype=dtype), mask)

    return grid(logps), (grid(entropies) if entropy else None)


def chunked_lm_loss(hidden: Tensor, labels: Tensor, head: torch.nn.Module, chunk_tokens: int) -> tuple[Tensor, Tensor]:
    """`packed_lm_loss` from the final hidden states `[B, L, H]`, without the `[B, L, V]` logits.

    Only labelled positions go through the LM head, `chunk_tokens` at a time, each chunk under activation
    checkpointing: its logits exist only while its loss is computed (and again in backward), so the peak is one
    chunk's `[chunk_tokens, V]` instead of every position's logits, their float32 copy and what cross-entropy keeps
    for backward. `head` is called as a module (`get_output_embeddings()`), so strategies that gather weights in
    module hooks (DeepSpeed ZeRO-3) see each call, the recompute included.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    shifted = labels[:, 1:]  # position t predicts label t + 1
    keep = shifted != IGNORE_INDEX  # [B, L-1]
    states = hidden[:, :-1][keep]  # [N, H] labelled positions only
    targets = shifted[keep]  # [N]
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, targets.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        total = total + checkpoint(_head_cross_entropy, head, states[piece], targets[piece], use_reentrant=False)
    return total, keep.sum()


def _head_cross_entropy(head: torch.nn.Module, states: Tensor, targets: Tensor) -> Tensor:
    logits = head(states)  # [n, V]
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def shared_prefix_logits(model, batch: SharedPrefixBatch, hidden: bool = False) -> torch.Tensor:
    """Logits `[n, T, V]` predicting each completion token of `batch`, with the prompt run once (see the module
    docstring); with `hidden`, the final hidden states `[n, T, H]` that predict them instead (for a chunked LM
    head, `model/forward.py`). `model` is a transformers causal LM (taking and returning `past_key_values`)."""
    device = next(model.parameters()).device
    prompt = batch.prompt_ids.to(device)
    ids = batch.input_ids.to(device)
    n, width = ids.shape
    if hidden:
        states, head = final_hidden_states(model, input_ids=prompt, use_cache=True)
        first = states[:, -1:]  # [1, 1, H] predicts completion token 0
    else:
        head = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        first = head.logits  # [1, 1, V]
    cache = head.past_key_values
    if cache is None:
        raise RuntimeError("the model returned no key/value cache (gradient checkpointing on?); use "
                           "micro_batch_layout 'padded' or 'packed'")
    cache.batch_repeat_interleave(n)  # differentiable: every row's gradient flows back into the one prompt pass
    position_ids = torch.arange(prompt.size(1), prompt.size(1) + width, device=device).expand(n, width)
    kwargs = dict(input_ids=ids, position_ids=position_ids, past_key_values=cache, use_cache=True)
    if hidden:
        rest = final_hidden_states(model, **kwargs)[0][:, :-1]  # the last position predicts nothing
    else:  # logits_to_keep = the first width - 1 positions
        rest = model(**kwargs, logits_to_keep=torch.arange(width - 1, device=device)).logits
    return torch.cat([first.expand(n, 1, -1), rest], dim=1)


def completion_logits(rows: torch.Tensor, input_ids: torch.Tensor,
                      packed: PackedSequences) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' values (logits or hidden states) `[N, D]` at the positions that predict the N real completion tokens,
    and those tokens `[N]`, in the row-major order of `packed.mask` (`scatter_tokens` puts per-token results back on
    the `[n, T]` grid). Only real positions are gathered: no `[n, T_max, D]` tensor (see the module docstring).
    """
    width = input_ids.size(1)
    shifted = packed.gather_index[packed.mask.bool()]  # [N] positions in the shifted [B * (L - 1)] grid
    if width < 2:
        shifted = shifted[:0]
    flat = (shifted // max(width - 1, 1)) * width + shifted % max(width - 1, 1)  # [N] the same positions in [B * L]
    flat = flat.to(rows.device)
    values = rows.reshape(-1, rows.size(-1)).index_select(0, flat)  # [N, D]
    return values, input_ids.reshape(-1).index_select(0, flat.to(input_ids.device) + 1)
