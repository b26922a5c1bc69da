"""Assistant-only masking: exactly the assistant text after the generation prompt carries labels."""

from qed_lightning.data.chat import IGNORE_INDEX, tokenize_conversation


def _labelled_text(tokenizer, ex):
    return tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=False)


def test_only_assistant_tokens_carry_labels(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "Prove that $n^2 \\geq n$ for every positive integer $n$."},
        {"role": "assistant", "content": "<think>\nSince n >= 1, multiply.\n</think>\n\nProof. $n^2 = n \\cdot n \\geq n$."},
    ]
    ex = tokenize_conversation(tiny_tokenizer, messages)
    # The generation prompt "<|im_start|>assistant\n<think>\n" is context; the model generates everything after it,
    # up to and including its end-of-turn marker.
    assert _labelled_text(tiny_tokenizer, ex) == (
        "Since n >= 1, multiply.\n</think>\n\nProof. $n^2 = n \\cdot n \\geq n$.<|im_end|>"
    )
    # Labels equal the input ids where set, and the labelled tokens are one contiguous block at the end.
    positions = [i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX]
    assert all(ex.labels[i] == ex.input_ids[i] for i in positions)
    assert positions == list(range(positions[0], positions[-1] + 1))
    assert positions[-1] == len(ex.input_ids) - 2  # the final "\n" after <|im_end|> is not trained
    prompt = tiny_tokenizer.decode(ex.input_ids[: positions[0]], skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert "Prove that" in prompt


def test_multi_turn_masks_every_assistant_turn_and_no_user_turn(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "<think>\na\n</think>\n\nFirst answer."},
        {"role": "user", "content": "Second question?"},
        {"role": "assistant", "content": "<think>\nb\n</think>\n\nSecond answer."},
    ]
    ex = tokenize_conversation(tiny_tokenizer, messages)
    text = _labelled_text(tiny_tokenizer, ex)
    assert text == "a\n</think>\n\nFirst answer.<|im_end|>b\n</think>\n\nSecond answer.<|im_end|>"
    assert "question" not in text


def test_truncation_keeps_prefix_and_flags_it(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>\n" + "long reasoning " * 50 + "\n</think>\n\nP."},
    ]
    full = tokenize_conversation(tiny_tokenizer, messages)
    cut = tokenize_conversation(tiny_tokenizer, messages, max_length=20)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]
