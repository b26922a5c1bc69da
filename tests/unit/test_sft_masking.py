"""Assistant-only masking: exactly the assistant text after the generation prompt carries labels."""

from qed_lightning.data.chat import IGNORE_INDEX, tokenize_conversation


def _labelled_text(tokenizer, ex):
    return tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=False)


def test_only_assistant_tokens_carry_labels(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "Prove that $n^2 \\geq n$ for every positive integer $n$."},
        {"role": "assistant",
         "content": "<think>\nSince n >= 1, multiply.\n</think>\n\nProof. $n^2 = n \\cdot n \\geq n$."},
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


def test_cut_thinking_keeps_prompt_and_proof_and_drops_the_end_of_the_thinking(tiny_tokenizer):
    """`truncation: thinking`: the excess comes out of the thinking just before `</think>`, the proof stays whole,
    and the `</think>` after the cut carries no loss; too little thinking to cut is left for the caller to drop."""
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>\n" + "long reasoning " * 50 + "\n</think>\n\nThe proof is done."},
    ]
    full = tokenize_conversation(tiny_tokenizer, messages)
    n = len(full.input_ids)
    cut = tokenize_conversation(tiny_tokenizer, messages, max_length=n - 30, cut_thinking=True)
    assert cut.truncated and cut.thinking_cut == 30 and cut.full_length == n and len(cut.input_ids) == n - 30
    close = tiny_tokenizer.convert_tokens_to_ids("</think>")
    hi = len(full.input_ids) - 1 - full.input_ids[::-1].index(close)  # the last </think>: the assistant's
    # [prompt + thinking up to the cut] + [</think> + proof]: the same tokens as the full example on each side
    assert cut.input_ids == full.input_ids[: hi - 30] + full.input_ids[hi:]
    assert cut.labels[: hi - 30] == full.labels[: hi - 30] and cut.labels[hi - 30 + 1:] == full.labels[hi + 1:]
    assert cut.labels[hi - 30] == -100 and full.labels[hi] == close  # </think> trained in full, not after the cut
    assert tiny_tokenizer.decode(cut.input_ids).endswith(tiny_tokenizer.decode(full.input_ids[hi:]))
    # the thinking cannot absorb an excess larger than itself: returned whole, flagged, for the caller to drop
    too_much = tokenize_conversation(tiny_tokenizer, messages, max_length=8, cut_thinking=True)
    assert too_much.truncated and too_much.thinking_cut == 0 and too_much.input_ids == full.input_ids


def test_the_sft_data_module_counts_and_reports_each_truncation_policy(tiny_model_dir, samples_dir, tmp_path):
    import json
    from types import SimpleNamespace

    from qed_lightning.data import SFTDataModule

    seen = {}
    for policy in ("drop", "truncate", "thinking"):
        data = SFTDataModule(str(samples_dir / "fineproofs_sft.jsonl"), tokenizer=str(tiny_model_dir), max_length=600,
                             truncation=policy, packing=False)
        data.trainer = SimpleNamespace(default_root_dir=str(tmp_path / policy), is_global_zero=True)
        data.setup("fit")
        report = json.loads((tmp_path / policy / "data_report.json").read_text())
        seen[policy] = (data.stats, report, len(data.train_rows))
    stats, report, rows = seen["drop"]
    over = stats["data/truncated"]
    assert 0 < over < stats["data/examples"] == 24  # some samples are longer than 600 tokens, not all
    tokens = report["tokens"]
    assert tokens["p50"] <= tokens["p90"] <= tokens["max"] and tokens["max"] > 600 and report["truncated"] == over
    assert stats["data/dropped"] == over and rows == 24 - over
    assert seen["truncate"][0]["data/dropped"] == 0 and seen["truncate"][2] == 24
    cut_stats, _, cut_rows = seen["thinking"]
    assert cut_stats["data/thinking_cut"] + cut_stats["data/dropped"] == over and cut_stats["data/thinking_cut"] > 0
    assert cut_rows == 24 - cut_stats["data/dropped"]
