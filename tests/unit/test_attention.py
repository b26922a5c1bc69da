"""Varlen attention on CPU: a pure-torch stand-in for a flash-style kernel, registered under a name without "flash"
(as kernels-hub backends are), is detected by capability; RL's packed layout hands it the packer's sequence
boundaries, SFT's packed rows theirs (read once from the position ids), and both give the sdpa results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from qed_lightning.model.attention import packs_without_mask, segment_lengths, varlen_kwargs
from qed_lightning.modules import RubricRLModule, SFTModule
from qed_lightning.rewards import RubricJudge
from qed_lightning.rollout import HFEngine
from qed_lightning.rollout.base import Completion

from fakes import NoClient

NAME = "qed_test_varlen"  # no "flash" in it: a name test would miss it
CALLS: list[list[int]] = []


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each `cu_seq_lens_q` segment of a `[1, heads, L, d]` row; fails without boundaries."""
    assert attention_mask is None and query.size(0) == 1
    cu = kwargs["cu_seq_lens_q"].tolist()
    assert kwargs["cu_seq_lens_k"].tolist() == cu and kwargs["max_length_q"] == max(b - a for a, b in zip(cu, cu[1:]))
    CALLS.append(cu)
    groups = query.size(1) // key.size(1)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                                    scale=scaling) for a, b in zip(cu, cu[1:])], dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, _varlen_attention)
AttentionMaskInterface.register(NAME, flash_attention_mask)


def test_capability_detection_and_boundaries_by_hand():
    from transformers import Qwen3Config

    config = Qwen3Config()
    for impl, varlen in (("sdpa", False), ("eager", False), ("flash_attention_2", True), (NAME, True)):
        config._attn_implementation = impl
        assert packs_without_mask(config) is varlen, impl
    assert segment_lengths(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])) == [3, 2, 2, 3]
    kw = varlen_kwargs([3, 2, 4], "cpu")
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["max_length_q"] == kw["max_length_k"] == 4


def _rl(tiny, attn, layout):
    module = RubricRLModule(str(tiny), engine=HFEngine(), judge=RubricJudge(NoClient()), attn_implementation=attn,
                            micro_batch_layout=layout, temperature=0.8)
    module.configure_model()
    return module


def test_rl_packed_layout_passes_the_packer_boundaries(tiny_model_dir):
    rollouts = [Completion([5, 6, 7], [20, 21, 22, 23], [0.0] * 4, "stop", ""),
                Completion([8, 9], [24], [0.0], "stop", ""),
                Completion([10, 11, 12, 13], [25, 26], [0.0] * 2, "stop", "")]
    varlen = _rl(tiny_model_dir, NAME, "auto")
    assert varlen.policy_update.layout == "packed"  # chosen by capability
    padded = _rl(tiny_model_dir, "sdpa", "padded")
    padded.model.load_state_dict(varlen.model.state_dict())
    CALLS.clear()
    logp, ent, mask = varlen.policy_update.token_stats(rollouts, [0, 1, 2], entropy=True)
    # every layer got the packer's boundaries: sequences of 3+4, 2+1, 4+2 tokens
    assert CALLS == [[0, 7, 10, 16]] * varlen.model.config.num_hidden_layers
    want_logp, want_ent, want_mask = padded.policy_update.token_stats(rollouts, [0, 1, 2], entropy=True)
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [0, 8])
def test_sft_rows_run_as_one_varlen_row(tiny_model_dir, chunk):
    from qed_lightning.data.chat import IGNORE_INDEX

    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]]),
             "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]])}
    batch["labels"] = batch["input_ids"].masked_fill(batch["position_ids"] == 0, IGNORE_INDEX)
    batch["labels"][1, 4:] = IGNORE_INDEX
    losses = []
    for attn in (NAME, "sdpa"):
        module = SFTModule(str(tiny_model_dir), attn_implementation=attn, loss_chunk_tokens=chunk)
        module.configure_model()
        CALLS.clear()
        losses.append(module.compute_loss(batch)[0])
        if attn == NAME:  # one [1, 12] row: segments 3, 3 | 4, 2 (the padding is its own)
            assert CALLS == [[0, 3, 6, 10, 12]] * module.model.config.num_hidden_layers
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
