"""The RL forward: the policy's outputs at the positions that predict completion tokens, for the micro-batch
layouts of `qed_lightning.rl.microbatch` (which plans and lays them out without running any model).

- `shared_prefix_logits`: the "shared_prefix" layout, the prompt run once and its key/value cache repeated for the
  completions that share it;
- `completion_logits`: for "packed" and "padded" rows, only the real completion positions gathered as a flat
  `[N, D]` (never the padded `[n, T_max, D]`; see the `rl.microbatch` docstring).
"""

from __future__ import annotations

import torch

from qed_lightning.model.lm_head import final_hidden_states
from qed_lightning.rl.microbatch import PackedSequences, SharedPrefixBatch

__all__ = ["completion_logits", "shared_prefix_logits"]


def shared_prefix_logits(model, batch: SharedPrefixBatch, hidden: bool = False) -> torch.Tensor:
    """Logits `[n, T, V]` predicting each completion token of `batch`, with the prompt run once (see the module
    docstring); with `hidden`, the final hidden states `[n, T, H]` that predict them instead (for a chunked LM
    head, `lm_head.py`). `model` is a transformers causal LM (taking and returning `past_key_values`)."""
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


def completion_logits(rows: torch.Tensor, input_ids: torch.Tensor, packed: PackedSequences) -> tuple[torch.Tensor, torch.Tensor]:
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
