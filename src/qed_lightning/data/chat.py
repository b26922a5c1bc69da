"""Chat templating: prompt ids of one user turn, and conversations with an assistant-only loss mask.

`chat_prompt_ids` is the one way a user turn becomes prompt token ids (the RL policy prompt, the reasoning-cache
states and summaries, every evaluation scaffold): the tokenizer's own chat template with the generation prompt,
no system prompt (as the paper), so the policy sees at training exactly what it sees at evaluation.

The paper trains on the assistant turn only, thinking and proof both. We render the conversation with the
tokenizer's own chat template (so the model sees exactly what it will see at inference) and mark as trainable the
characters of each assistant turn that come *after* its generation prompt: for a Qwen3-Thinking template the
generation prompt is `<|im_start|>assistant\\n<think>\\n`, so the trained span is `reasoning...</think>\\n\\nproof
<|im_end|>`, which is exactly what the model generates at inference. The span is found by rendering prefixes of the
conversation (with and without the generation prompt), which works for any template whose rendering of a prefix is
a prefix of the full rendering; templates that rewrite earlier turns are detected and rejected with a clear error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

IGNORE_INDEX = -100
#: the paper's policy prompt (one user turn, no system prompt); `{problem}` is replaced by the statement
POLICY_PROMPT = "Generate a rigorous proof to the following question:\n\n{problem}"


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on tokens that carry no loss
    truncated: bool = False
    thinking_cut: int = 0  # thinking tokens removed to fit (`cut_thinking`); 0 = none
    full_length: int = 0  # tokens before any truncation or cut

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def chat_prompt_ids(tokenizer, content: str) -> list[int]:
    """One user turn, chat-templated with the generation prompt, as token ids (no system prompt)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and return (text, [(start, end)]) character spans of the trainable assistant text."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        with_prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(upto):
            raise ValueError("The chat template renders earlier turns differently once later turns are added; "
                             "assistant-only masking needs a prefix-stable template.")
        start = len(os.path.commonprefix([with_prompt, upto]))
        end = len(upto.rstrip())  # the turn's end marker (e.g. <|im_end|>) is trained, the newline after it is not
        if end > start:
            spans.append((start, end))
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None = None,
                          cut_thinking: bool = False) -> TokenizedExample:
    """Tokenize a chat with labels on the assistant spans only; truncate to `max_length` tokens if given.

    With `cut_thinking`, an example that is too long loses the end of its last assistant turn's thinking instead
    (the tokens just before `</think>`), so the prompt, the start of the thinking and the whole proof stay; the
    `</think>` after the cut carries no loss (the model is not taught to close a thought mid-way). When the thinking
    is too short to absorb the excess (or there is no `</think>`), the example is returned whole and marked
    truncated, for the caller to drop."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    span_iter = iter(spans)
    span = next(span_iter, None)
    for idx, (tok_start, tok_end) in enumerate(enc["offset_mapping"]):
        while span is not None and tok_start >= span[1]:
            span = next(span_iter, None)
        if span is not None and tok_start >= span[0] and tok_end <= span[1] and tok_end > tok_start:
            labels[idx] = input_ids[idx]
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated and cut_thinking:
        cut = _thinking_cut(text, enc["offset_mapping"], spans, len(input_ids) - max_length)
        if cut is None:
            return TokenizedExample(input_ids=input_ids, labels=labels, truncated=True, full_length=len(input_ids))
        lo, hi = cut  # [lo, hi): thinking tokens to remove; hi is the `</think>` token
        labels = labels[:lo] + [IGNORE_INDEX] + labels[hi + 1:]
        return TokenizedExample(input_ids=input_ids[:lo] + input_ids[hi:], labels=labels, truncated=True,
                                thinking_cut=hi - lo, full_length=len(input_ids))
    full_length = len(input_ids)
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedExample(input_ids=input_ids, labels=labels, truncated=truncated, full_length=full_length)


def _thinking_cut(text: str, offsets: list[tuple[int, int]], spans: list[tuple[int, int]], excess: int
                  ) -> tuple[int, int] | None:
    """The token range `[lo, hi)` of `excess` thinking tokens that end just before the last assistant turn's
    `</think>` (token `hi`), or None when that thinking has fewer than `excess` + 1 tokens."""
    if not spans:
        return None
    start, end = spans[-1]
    close = text.rfind("</think>", start, end)
    if close < 0:
        return None
    hi = next(i for i, (a, _) in enumerate(offsets) if a >= close)
    first = next(i for i, (a, _) in enumerate(offsets) if a >= start)
    lo = hi - excess
    return (lo, hi) if lo > first else None
