"""RL micro-batch layouts: packed and padded give the same completion log-probs as one sequence at a time."""

import torch
from transformers import AutoModelForCausalLM

from qed_lightning.rl import token_logprobs
from qed_lightning.rl.microbatch import completion_logits, pack_sequences, pad_sequences, plan_microbatches


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
        logits, targets = completion_logits(model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits, mb.input_ids, mb)
        assert [t[: len(completions[k])].tolist() for t, k in zip(targets, members)] == [completions[k] for k in members]
        logp = token_logprobs(logits, targets) * mb.mask
        for row, k in enumerate(members):
            n = len(completions[k])
            torch.testing.assert_close(logp[row, :n], expected[row], atol=1e-10, rtol=0)
            assert mb.mask[row].sum() == n


def test_padded_plan_respects_rows_times_longest():
    # lengths 5,3,4,2 with budget 8: 5 alone (2 rows of 5 = 10 > 8); 4 then 3 (2 x 4 = 8); 2 alone would fit a
    # third row? 3 x 4 = 12 > 8, so 2 opens a new micro-batch
    assert plan_microbatches([5, 3, 4, 2], 8, layout="padded") == [[0], [2, 1], [3]]
    assert plan_microbatches([5, 3, 4, 2], 8, layout="packed") == [[0, 1], [2, 3]]
