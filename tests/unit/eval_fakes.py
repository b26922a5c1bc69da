"""Model-free stand-ins shared by the tests/unit/test_eval_*.py files: a tokenizer, a scripted engine, a judge
client."""

from __future__ import annotations

from collections.abc import Callable

from qed_lightning.rewards.clients import JudgeClient
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig


class FakeTokenizer:
    """`apply_chat_template` turns a user turn into one token id that `text_of` maps back to the user text."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        self.texts.append(messages[-1]["content"])
        return [len(self.texts) - 1]

    def text_of(self, ids: list[int]) -> str:
        return self.texts[ids[0]]


class FakeEngine(RolloutEngine):
    """Answers each prompt with `reply(user_text) -> (text, n_tokens, finish_reason)`; records every call."""

    def __init__(self, tokenizer: FakeTokenizer, reply: Callable[[str], tuple[str, int, str]]) -> None:
        self.tokenizer, self.reply = tokenizer, reply
        self.calls: list[list[str]] = []  # the user texts of each generate call
        self.loaded = 0
        self.policy_version = 0

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, n: int = 1) -> list[list[Completion]]:
        texts = [self.tokenizer.text_of(p) for p in prompts]
        self.calls.append(texts)
        groups = []
        for p, text in zip(prompts, texts):
            out, tokens, finish = self.reply(text)
            groups.append([Completion(p, list(range(tokens)), [0.0] * tokens, finish, out, self.policy_version)
                           for _ in range(n)])
        return groups

    def load_weights(self, named_tensors) -> None:
        list(named_tensors)
        self.loaded += 1


class FakeJudgeClient(JudgeClient):
    """Replies `reply(prompt)`; records every prompt it was sent."""

    def __init__(self, reply: Callable[[str], str]) -> None:
        self.reply = reply
        self.prompts: list[str] = []

    @property
    def model_name(self) -> str:
        return "fake-judge"

    async def complete(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.reply(prompt)


def proof_in(prompt: str) -> str:
    """The proof between the judge templates' proof markers, inside the judge's per-call fence."""
    from qed_lightning.testing.judge_rules import proof_section

    return proof_section(prompt)
