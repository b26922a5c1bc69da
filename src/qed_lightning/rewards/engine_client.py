"""An in-process judge: a local `RolloutEngine` (vLLM or transformers) plays the grader (SPEC 4).

Paper's choice: the judge is a separate server. Ours, in addition: a judge that runs on an engine in this process,
for single-node runs and tests. The prompt is one user turn rendered with the tokenizer's chat template
(generation prompt added); the reply is the completion text after its last `</think>` when the judge thinks
first (Qwen3-style templates open a `<think>` block), else the whole completion.

Concurrent `complete` calls that arrive in the same event-loop tick are sent to the engine as one batch (engines
batch far better than they serve one prompt at a time), and the engine is never called from two threads at once.
An exception inside the engine is a bug or a crash of this process, not a judge verdict: it propagates. A reply
that stopped at `max_tokens` is not a verdict either: it raises `JudgeError("incomplete")`, as for the HTTP clients.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qed_lightning.rewards.clients import JudgeClient, JudgeError
from qed_lightning.rewards.parsing import THINK_CLOSE
from qed_lightning.rollout.base import RolloutEngine, SamplingConfig

__all__ = ["EngineJudgeClient"]


def _reply_text(completion_text: str) -> str:
    head, sep, tail = completion_text.rpartition(THINK_CLOSE)
    return tail if sep else completion_text


class EngineJudgeClient(JudgeClient):
    """A judge on a local rollout engine.

    Args:
        engine: the engine that runs the judge model.
        tokenizer: the judge model's tokenizer, or its path / hub id (loaded with `AutoTokenizer` on first use).
        temperature: judge sampling temperature.
        top_p: nucleus sampling mass.
        max_tokens: reply budget.
        seed: sampling seed (None = nondeterministic).
        model: the name recorded in the grade cache key (default: the tokenizer's `name_or_path`).
    """

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: str | PreTrainedTokenizerBase,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 4096,
        seed: int | None = None,
        model: str | None = None,
    ):
        self.engine = engine
        self._tokenizer = tokenizer
        self.sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, seed=seed)
        self.model = model
        self._engine_lock = threading.Lock()
        self._pending: list[tuple[list[int], asyncio.Future]] = []
        self._batches: set[asyncio.Task] = set()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if isinstance(self._tokenizer, str):
            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer)
        return self._tokenizer

    @property
    def model_name(self) -> str:
        if self.model:
            return self.model
        if isinstance(self._tokenizer, str):
            return self._tokenizer
        return str(getattr(self._tokenizer, "name_or_path", "") or "engine")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_engine_lock=None, _pending=[], _batches=set())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._engine_lock = threading.Lock()

    def encode(self, prompt: str) -> list[int]:
        """Token ids of `prompt` as a single user turn, with the generation prompt appended."""
        messages = [{"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def complete(self, prompt: str) -> str:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((self.encode(prompt), future))
        if len(self._pending) == 1:
            # Scheduled behind the tasks that are already runnable, so their prompts join this batch.
            loop.call_soon(self._start_batch)
        return await future

    def _start_batch(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._run_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(self, batch: list[tuple[list[int], asyncio.Future]]) -> None:
        try:
            outputs = await asyncio.to_thread(self._generate, [ids for ids, _ in batch])
        except Exception as err:  # noqa: BLE001 - handed to every waiting caller, which re-raises it
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), completions in zip(batch, outputs, strict=True):
            if future.done():
                continue
            reply = _reply_text(completions[0].text)
            if completions[0].truncated:  # cut off at max_tokens: whatever it holds is not the judge's verdict
                future.set_exception(JudgeError(
                    "incomplete", f"the engine judge's reply stopped at max_tokens={self.sampling.max_new_tokens}; "
                    "raise the judge client's max_tokens", retryable=False, reply=reply))
            else:
                future.set_result(reply)

    def _generate(self, prompts: list[list[int]]):
        with self._engine_lock:
            return self.engine.generate(prompts, self.sampling, n=1)
