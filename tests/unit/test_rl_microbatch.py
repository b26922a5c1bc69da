"""RL micro-batch layouts: packed and padded give the same completion log-probs as one sequence at a time."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from qed_lightning.model.forward import completion_logits, shared_prefix_logits
from qed_lightning.model.forward import token_logprobs
from qed_lightning.rl.microbatch import (
    pack_sequences,
    pad_sequences,
    plan_microbatches,
    plan_shared_prefix,
    scatter_tokens,
    share_prefix,
)


def _single(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1]  # predicts the completion
    return token_logprobs(logits[None], torch.tensor([completion]))[0]


def test_packed_and_padded_layouts_match_one_at_a_time(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    completions = [[20, 21, 22], [23], [24, 25, 26, 27, 28]]
    members = [2, 0, 1]
    expected = [_single(model, prompts[k], completions[k]) for k in members]
    for layout in (pack_sequences, pad_sequences):
        mb = layout(prompts, completions, members)
        logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
        logits, targets = completion_logits(logits, mb.input_ids, mb)
        assert targets.tolist() == [t for k in members for t in completions[k]]  # [N], real tokens only
        logp = scatter_tokens(token_logprobs(logits[None], targets[None])[0], mb.mask)
        for row, k in enumerate(members):
            n = len(completions[k])
            torch.testing.assert_close(logp[row, :n], expected[row], atol=1e-10, rtol=0)
            assert mb.mask[row].sum() == n


def test_padded_plan_respects_rows_times_longest():
    # lengths 5,3,4,2 with budget 8: 5 alone (2 rows of 5 = 10 > 8); 4 then 3 (2 x 4 = 8); 2 alone would fit a
    # third row? 3 x 4 = 12 > 8, so 2 opens a new micro-batch
    assert plan_microbatches([5, 3, 4, 2], 8, layout="padded") == [[0], [2, 1], [3]]
    assert plan_microbatches([5, 3, 4, 2], 8, layout="packed") == [[0, 1], [2, 3]]


def test_shared_prefix_plan_keeps_one_prompt_per_micro_batch():
    prompts = [[1, 2], [1, 2], [3], [1, 2]]
    assert plan_shared_prefix(prompts, [4, 2, 5, 3], [0, 1, 2, 3], 10) == [[0, 3], [1], [2]]
    assert plan_shared_prefix(prompts, [4, 2, 5, 3], [0, 1, 2, 3], 100) == [[0, 3, 1], [2]]
    assert plan_shared_prefix(prompts, [4, 2, 5, 3], [1, 2], 1) == [[1], [2]]  # a row longer than the budget: alone


def test_shared_prefix_matches_one_at_a_time_in_values_and_gradients(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    prompt = [5, 6, 7, 8, 9]
    completions = [[20, 21, 22], [23], [24, 25, 26, 27, 28]]
    prompts = [prompt] * 3
    weights = torch.randn(3, 5, dtype=torch.float64)  # an arbitrary per-token objective

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = [_single(model, prompt, c) for c in completions]
    want = grads(sum((e * weights[k, : len(e)]).sum() for k, e in enumerate(expected)))
    mb = share_prefix(prompts, completions, [0, 1, 2])
    logp = token_logprobs(shared_prefix_logits(model, mb), mb.input_ids) * mb.mask
    for k, e in enumerate(expected):
        torch.testing.assert_close(logp[k, : len(e)], e.detach(), atol=1e-10, rtol=0)
        assert mb.mask[k].sum() == len(completions[k])
    got = grads((logp * weights).sum())
    # Qwen3's RMSNorm computes in float32 even for float64 weights, so the prompt's gradient (summed over rows here,
    # over separate passes in `want`) differs at float32 rounding: 1e-7 of the largest entry, not 1e-16
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-6 * float(g.abs().max()), rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in want.values())


def test_shared_prefix_refuses_mixed_prompts():
    with pytest.raises(ValueError, match=r"micro-batch \[0, 1\]"):
        share_prefix([[1, 2], [1, 3]], [[4], [5]], [0, 1])


def test_chunked_token_stats_match_full_logits_in_value_and_gradient(tiny_model_dir):
    from qed_lightning.model.forward import chunked_token_stats, final_hidden_states
    from qed_lightning.model.forward import entropy_from_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    prompts = [[5, 6, 7, 8, 9]] * 3
    completions = [[20, 21, 22], [23], [24, 25, 26, 27, 28]]
    weights = torch.randn(3, 5, dtype=torch.float64)

    def run(stats):
        model.zero_grad()
        logp, ent = stats()
        ((logp * weights).sum() + (ent * weights.flip(0)).sum()).backward()
        return logp.detach(), ent.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    mb = pad_sequences(prompts, completions, [0, 1, 2])

    def full():
        logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
        logits, targets = completion_logits(logits, mb.input_ids, mb)
        return (scatter_tokens(token_logprobs(logits[None], targets[None], 0.8)[0], mb.mask),
                scatter_tokens(entropy_from_logits(logits[None], 0.8)[0], mb.mask))

    def chunked(chunk):
        def fn():
            rows, _ = final_hidden_states(model, input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False)
            states, targets = completion_logits(rows, mb.input_ids, mb)  # the same gather, on hidden states
            return chunked_token_stats(states, targets, mb.mask, model.get_output_embeddings(), 0.8, entropy=True,
                                       chunk_tokens=chunk)
        return fn

    def shared():
        sp = share_prefix(prompts, completions, [0, 1, 2])
        states = shared_prefix_logits(model, sp, hidden=True)  # [n, T, H]
        real = sp.mask.bool()
        return chunked_token_stats(states[real], sp.input_ids[real], sp.mask, model.get_output_embeddings(), 0.8,
                                   entropy=True, chunk_tokens=2)

    want_lp, want_ent, want_grads = run(full)
    for stats in (chunked(1), chunked(4), chunked(100), shared):
        lp, ent, grads = run(stats)
        torch.testing.assert_close(lp, want_lp, atol=1e-10, rtol=0)
        torch.testing.assert_close(ent, want_ent, atol=1e-10, rtol=0)
        assert lp[1, 1:].abs().sum() == 0 and ent[1, 1:].abs().sum() == 0  # masked positions stay 0
        for name, g in want_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6 * float(g.abs().max()) + 1e-12, rtol=1e-5, msg=name)


class _Shapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an op produces while active, and which of them own new memory (not a view
    of `base`)."""

    def __init__(self, base: torch.Tensor) -> None:
        super().__init__()
        self.base = base.untyped_storage().data_ptr()
        self.shapes: list[tuple[int, ...]] = []
        self.allocated: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                if t.untyped_storage().data_ptr() != self.base:
                    self.allocated.append(tuple(t.shape))
        return out


def _previous_completion_logits(rows, input_ids, packed):
    """The gather as it was: a padded `[n, T_max, D]` grid of every sequence's positions (the reference here)."""
    index = packed.gather_index  # [n, T]
    flat = rows[:, :-1].reshape(-1, rows.size(-1))
    return flat[index.reshape(-1)].reshape(*index.shape, -1), input_ids[:, 1:].reshape(-1)[index]


@pytest.mark.parametrize("layout", [pack_sequences, pad_sequences])
def test_completion_gather_equals_the_padded_gather_on_real_tokens_without_allocating_it(layout):
    # ragged: one long completion and three short ones (hand-sized so that no other tensor is [n, T_max, H])
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    completions = [[11] * 17, [12, 13], [14], [15, 16, 17]]
    members = [0, 1, 2, 3]
    mb = layout(prompts, completions, members)
    hidden = 24
    rows = torch.randn(*mb.input_ids.shape, hidden, dtype=torch.float64)  # [B, L, H] stand-in hidden states
    with _Shapes(rows) as seen:
        values, targets = completion_logits(rows, mb.input_ids, mb)
    real = mb.mask.bool()
    old_values, old_targets = _previous_completion_logits(rows, mb.input_ids, mb)
    assert values.shape == (sum(map(len, completions)), hidden)
    assert torch.equal(values, old_values[real]) and torch.equal(targets, old_targets[real])
    assert targets.tolist() == [t for k in members for t in completions[k]]
    n, t_max = len(members), max(map(len, completions))
    assert (n, t_max, hidden) not in seen.shapes and (n * t_max, hidden) not in seen.shapes
    # the only new memory the size of hidden states: the N real rows
    assert max(torch.Size(s).numel() for s in seen.allocated) == int(real.sum()) * hidden


def test_scatter_tokens_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    got = scatter_tokens(torch.tensor([0.5, -1.0, 2.0], requires_grad=True), mask)
    assert got.tolist() == [[0.5, -1.0, 0.0], [2.0, 0.0, 0.0]]
