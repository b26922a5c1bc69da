"""Packing: a packed batch gives the same loss as the examples one at a time, and position ids restart."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from qed_lightning.data.chat import IGNORE_INDEX, TokenizedExample, tokenize_conversation
from qed_lightning.data.packing import collate_rows, first_fit_decreasing, pack_row
from qed_lightning.model.forward import chunked_lm_loss
from qed_lightning.modules.sft import packed_lm_loss


def _conversation(i: int) -> list[dict]:
    body = "step " * (3 + 4 * i)
    return [
        {"role": "user", "content": f"Prove claim {i}."},
        {"role": "assistant", "content": f"<think>\n{body}\n</think>\n\nProof of claim {i}."},
    ]


def test_first_fit_decreasing_is_deterministic_and_respects_capacity():
    # lengths 5,3,4,2 with capacity 7: 5 opens bin0 (free 2), 4 opens bin1 (free 3), 3 fits bin1, 2 fits bin0.
    assert first_fit_decreasing([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]


def test_position_ids_restart_and_boundaries_are_unlabelled():
    a = TokenizedExample(input_ids=[10, 11, 12], labels=[IGNORE_INDEX, 11, 12])
    b = TokenizedExample(input_ids=[20, 21], labels=[20, 21])  # even a labelled first token is masked in a pack
    row = pack_row([a, b])
    assert row["position_ids"] == [0, 1, 2, 0, 1]
    assert row["labels"] == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21]
    batch = collate_rows([row, pack_row([b])], pad_id=0)
    # the second row is padded with 3 tokens that form their own segment (positions restart at 0) without labels
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 21, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert int(batch["num_real_tokens"]) == 7


def test_packed_loss_equals_token_weighted_mean_of_single_losses(tiny_model_dir, tiny_tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    examples = [tokenize_conversation(tiny_tokenizer, _conversation(i)) for i in range(4)]

    sums, counts = [], []
    for ex in examples:  # one at a time, no packing
        batch = collate_rows([pack_row([ex])], pad_id=0)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        s, n = packed_lm_loss(logits, batch["labels"])
        sums.append(s)
        counts.append(n)
    expected = torch.stack(sums).sum() / torch.stack(counts).sum()

    # two packed rows of two examples each, in one padded micro-batch
    rows = [pack_row(examples[:2]), pack_row(examples[2:][::-1])]
    batch = collate_rows(rows, pad_id=0)
    assert batch["position_ids"][0, len(examples[0].input_ids)] == 0  # restart at the second example
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    s, n = packed_lm_loss(logits, batch["labels"])
    assert int(n) == int(torch.stack(counts).sum())
    torch.testing.assert_close(s / n, expected, atol=1e-5, rtol=0)

    # the same rows *without* restarting position ids (attention across examples) give a different loss
    leaky = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
    leaky["position_ids"] = torch.arange(batch["input_ids"].size(1)).expand_as(batch["input_ids"])
    logits = model(input_ids=leaky["input_ids"], position_ids=leaky["position_ids"], use_cache=False).logits
    s_leaky, _ = packed_lm_loss(logits, leaky["labels"])
    assert abs(float(s_leaky / n - expected)) > 1e-4


def test_chunked_lm_loss_matches_full_logits_in_value_and_gradient(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    examples = [tokenize_conversation(tiny_tokenizer, _conversation(i)) for i in range(4)]
    batch = collate_rows([pack_row(examples[:2]), pack_row(examples[2:])], pad_id=0)
    ids, pos = batch["input_ids"], batch["position_ids"]

    def run(loss_fn):
        model.zero_grad()
        total, n = loss_fn()
        total.backward()
        return total.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}

    def full():
        return packed_lm_loss(model(input_ids=ids, position_ids=pos, use_cache=False).logits, batch["labels"])

    def chunked(chunk):
        def fn():
            hidden = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
            return chunked_lm_loss(hidden, batch["labels"], model.get_output_embeddings(), chunk)
        return fn

    want, n_want, grads_want = run(full)
    assert n_want > 10
    for chunk in (1, 7, 10_000):  # one token per chunk, a ragged last chunk, a single chunk
        got, n, grads = run(chunked(chunk))
        assert int(n) == int(n_want)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        for name, g in grads_want.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6 * float(g.abs().max()) + 1e-12, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        chunked_lm_loss(torch.zeros(1, 2, 3), batch["labels"][:, :2], model.get_output_embeddings(), 0)
