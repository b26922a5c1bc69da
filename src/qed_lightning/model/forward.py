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

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from qed_lightning.data.chat import IGNORE_INDEX
from qed_lightning.rl.microbatch import PackedSequences, SharedPrefixBatch

__all__ = ["chunked_lm_loss", "chunked_token_stats", "completion_logits", "entropy_from_logits", "final_hidden_states",
           "shared_prefix_logits", "shift_for_causal_lm", "token_logprobs"]

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
