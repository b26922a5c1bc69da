"""`ScriptedJudgeClient`: a judge client that brings its own scripted judge server (tests and CPU demos only).

A demo config swaps the real judge for this stand-in in one line:

    judge:
      class_path: qed_lightning.rewards.RubricJudge
      init_args:
        client:
          class_path: qed_lightning.testing.ScriptedJudgeClient
          init_args: {rule: char_fraction}

On first use it starts a `ScriptedJudgeServer` on a free local port and then talks to it over real HTTP through
`OpenAIJudgeClient`, so the demo exercises the same client code (retries, timeouts, both APIs) as a real run.
It logs a WARNING when its server starts: the scores come from a fixed rule, not from a model.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal

from qed_lightning.rewards.clients import OpenAIJudgeClient
from qed_lightning.testing.judge_rules import Rule, ScoringRule
from qed_lightning.testing.judge_server import ScriptedJudgeServer

__all__ = ["ScriptedJudgeClient"]

log = logging.getLogger(__name__)

_NOT_STARTED = "http://127.0.0.1:0/v1"  # replaced by the server's URL when it starts


class ScriptedJudgeClient(OpenAIJudgeClient):
    """An `OpenAIJudgeClient` bound to its own scripted judge server (started lazily, on a free port).

    Args:
        rule: "length", "keyword", "char_fraction" or "fixed" (see `qed_lightning.testing.judge_server`).
        keyword: the word counted by "keyword".
        chars_per_point: characters per point for "length".
        charset: the characters whose share of the proof "char_fraction" scores.
        score: the score "fixed" always gives.
        api: "chat" or "responses".
        faults: faults the server injects into the first requests (tests).
        delay_s: delay of the "timeout" fault.
        timeout_s, max_retries, backoff_s, max_concurrency, api_key_env: as for `OpenAIJudgeClient` (a key, if
            set, is sent as a Bearer header, so tests can check it never leaks).
    """

    def __init__(
        self,
        rule: Rule = "keyword",
        keyword: str = "proof",
        chars_per_point: int = 200,
        charset: str = "0123456789",
        score: int = 7,
        api: Literal["chat", "responses"] = "chat",
        faults: list[str] | None = None,
        delay_s: float = 5.0,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.05,
        max_concurrency: int = 16,
        api_key_env: str | None = None,
    ):
        self.rule = ScoringRule(rule, keyword, chars_per_point, charset, score)  # validates at the door
        super().__init__(
            base_url=_NOT_STARTED, model="scripted-judge", api=api, api_key_env=api_key_env, max_tokens=1024,
            timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s, max_concurrency=max_concurrency,
        )
        self.faults, self.delay_s = list(faults or []), delay_s
        self.server: ScriptedJudgeServer | None = None
        self._start_lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return f"scripted-judge[{self.rule.describe()}]"

    def start(self) -> ScriptedJudgeServer:
        """Start the scripted server (idempotent) and point the client at it."""
        with self._start_lock:
            if self.server is None:
                r = self.rule
                self.server = ScriptedJudgeServer(r.name, r.keyword, r.chars_per_point, r.charset, r.score,
                                                  faults=self.faults, delay_s=self.delay_s).start()
                self.base_url = self.server.url
                log.warning(
                    "ScriptedJudgeClient: grading with a SCRIPTED STAND-IN judge at %s (rule %s), not a real judge; "
                    "its scores follow a fixed rule. To grade with a model, set the judge's client to "
                    "class_path: qed_lightning.rewards.OpenAIJudgeClient with init_args base_url (e.g. "
                    "http://HOST:8000/v1 of `python -m vllm.entrypoints.openai.api_server --model openai/gpt-oss-20b`) "
                    "and model.", self.server.url, self.rule.describe(),
                )
        return self.server

    def _endpoint(self) -> str:
        self.start()
        return super()._endpoint()

    async def aclose(self) -> None:
        await super().aclose()
        self.close_server()

    def close_server(self) -> None:
        with self._start_lock:
            if self.server is not None:
                self.server.close()
                self.server, self.base_url = None, _NOT_STARTED

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(server=None, base_url=_NOT_STARTED, _start_lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._start_lock = threading.Lock()
