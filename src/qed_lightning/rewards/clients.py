"""Judge clients: send one rendered judge prompt, get the judge's reply text back (SPEC 4).

Paper's choice (reference implementation): gpt-oss-20b behind an OpenAI-compatible endpoint, Responses API,
reasoning effort "medium", temperature 1.0, up to 81,920 output tokens, 900 s timeout, 3 attempts with back-off.
Ours: the same defaults over the plain HTTP protocol with `httpx` (no SDK), for both the Chat Completions and the
Responses API, so any OpenAI-compatible server (vLLM, SGLang, a hosted API) can grade.

Choices worth knowing:
- `max_retries` counts attempts in total (the reference's "3 attempts"), not retries after the first.
- Retried: HTTP 5xx, 429 (waiting `Retry-After` when the server sends one), timeouts, connection errors and 200
  replies that are not a completion (malformed JSON, no text). Not retried: other 4xx (a bad request stays bad).
- A reply that did not finish is not a verdict: chat `finish_reason` "length" or "content_filter", a Responses body
  with `status: "incomplete"` (or an incomplete message item) raises `JudgeError("incomplete")` carrying the partial
  text. Whatever score tag a cut-off reply holds may be the judge quoting the proof, not its verdict, so it is never
  read (the judge records status "incomplete", counted as `judge/incomplete`, never cached). Not retried: the same
  budget cuts the same long reply again; raise `max_tokens`.
- Responses requests send `store: false`: a judge needs no server-side copy of its replies.
- The API key is read from the environment at each request and lives only in the request headers: it is never an
  attribute (so it is never pickled, logged or written to a run's config) and is masked in every error message.
- httpx connections belong to an event loop, so the client keeps one `httpx.AsyncClient` (and one concurrency
  semaphore) per running loop; `RubricJudge.grade` runs all batches on one long-lived loop, so connections are
  reused, and two judges may share one client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import weakref
from abc import ABC, abstractmethod
from typing import Any, Literal

import httpx

from qed_lightning.retry import backoff_s, retry_after_s, retryable_status

__all__ = ["JudgeClient", "JudgeError", "OpenAIJudgeClient"]

log = logging.getLogger(__name__)

JudgeErrorKind = Literal["http", "timeout", "malformed", "rate_limited", "incomplete"]
_Session = tuple[httpx.AsyncClient, asyncio.Semaphore]


class JudgeError(Exception):
    """A judge call that failed for good (after its retries, or at once for a non-retryable HTTP status).

    Attributes:
        kind: "http" (status or connection error), "timeout", "malformed" (a reply that is not a completion),
            "rate_limited" (HTTP 429), "incomplete" (the reply did not finish: token limit or content filter).
        retryable: whether another attempt could succeed.
        retry_after: seconds the server asked us to wait (HTTP 429 `Retry-After`), if any.
        reply: the partial reply text of an "incomplete" reply ("" otherwise), kept for inspection, never parsed.
        status: the HTTP status of an "http" or "rate_limited" error (None for a connection error).
    """

    def __init__(self, kind: JudgeErrorKind, message: str, retryable: bool = True, retry_after: float | None = None,
                 reply: str = "", status: int | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after
        self.reply = reply
        self.status = status

    @property
    def failure(self) -> str:
        """The failure's kind as the judge counts it: "timeout", "http_<status>", "connection", "malformed",
        "incomplete"."""
        if self.status is not None:
            return f"http_{self.status}"
        return "connection" if self.kind == "http" else self.kind


class JudgeClient(ABC):
    """Turns a rendered judge prompt into the judge's reply text. Subclass to plug in another judge backend."""

    @property
    @abstractmethod
    def model_name(self) -> str:
        """The judge model's name; part of the grade cache key."""

    @abstractmethod
    async def complete(self, prompt: str) -> str:
        """Send `prompt` as one user message; return the reply text or raise `JudgeError`."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections held on the running event loop."""


def _resolve_base_url(base_url: str) -> str:
    if not base_url.startswith("env:"):
        return base_url.rstrip("/")
    var = base_url[len("env:") :]
    value = os.environ.get(var, "").strip()
    if not value:
        raise ValueError(
            f"base_url {base_url!r} reads the judge endpoint from ${var}, which is not set; "
            f"export {var}=http://HOST:PORT/v1 or give base_url as a URL."
        )
    return value.rstrip("/")


class OpenAIJudgeClient(JudgeClient):
    """A judge behind an OpenAI-compatible HTTP endpoint (vLLM `--model openai/gpt-oss-20b`, or a hosted API).

    Args:
        base_url: the API root, e.g. "http://localhost:8000/v1", or "env:VARNAME" to read it from the environment.
        model: the served model name (sent as `model`; part of the grade cache key).
        api: "chat" (POST /chat/completions) or "responses" (POST /responses, the reference's choice).
        api_key_env: environment variable holding the API key (sent as `Authorization: Bearer ...`); None or an
            unset variable sends no key (a local vLLM server needs none).
        reasoning_effort: "low" / "medium" / "high" for reasoning judges (reference: "medium"); None omits it.
        temperature: judge sampling temperature (reference: 1.0).
        max_tokens: reply budget, reasoning included (reference: 81,920). vLLM rejects (HTTP 400, not retried) a
            request whose prompt + max_tokens exceeds the served context; None omits the field, and the server then
            allows whatever context is left.
        timeout_s: per-attempt limit in seconds, not counting the wait for a concurrency slot (reference: 900).
        max_retries: attempts in total, >= 1 (reference: 3).
        backoff_s: wait before the second attempt; doubles after each further failure.
        max_concurrency: requests in flight at once (per event loop, so per rank); a judge's own `max_concurrency`
            (the limit for the whole job) replaces it with its share of each rank.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api: Literal["chat", "responses"] = "chat",
        api_key_env: str | None = "OPENAI_API_KEY",
        reasoning_effort: str | None = None,
        temperature: float = 1.0,
        max_tokens: int | None = 81920,
        timeout_s: float = 900.0,
        max_retries: int = 3,
        backoff_s: float = 2.0,
        max_concurrency: int = 64,
    ):
        problems = []
        if api not in ("chat", "responses"):
            problems.append(f"api must be 'chat' or 'responses', got {api!r}")
        counts = {"max_retries": max_retries, "max_concurrency": max_concurrency, "max_tokens": max_tokens}
        for name, value in counts.items():
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if timeout_s <= 0 or backoff_s < 0:
            problems.append(f"timeout_s must be > 0 and backoff_s >= 0, got {timeout_s} and {backoff_s}")
        if problems:
            raise ValueError("OpenAIJudgeClient: " + "; ".join(problems) + ".")
        self.base_url = _resolve_base_url(base_url)
        self.model, self.api, self.api_key_env = model, api, api_key_env
        self.reasoning_effort, self.temperature, self.max_tokens = reasoning_effort, temperature, max_tokens
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.max_concurrency = max_concurrency
        # One connection pool and concurrency bound per event loop (see the module docstring).
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Session] = weakref.WeakKeyDictionary()

    @property
    def model_name(self) -> str:
        return self.model

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, api={self.api!r}, "
            f"api_key_env={self.api_key_env!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_sessions"]  # connections and loops do not travel
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._sessions = weakref.WeakKeyDictionary()

    # ---- request side ---------------------------------------------------------------------------------------
    def _endpoint(self) -> str:
        return f"{self.base_url}/{'chat/completions' if self.api == 'chat' else 'responses'}"

    def _api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None

    def _redact(self, text: str) -> str:
        key = self._api_key()
        return text.replace(key, "***") if key else text

    def _payload(self, prompt: str) -> dict[str, Any]:
        if self.api == "chat":
            messages = [{"role": "user", "content": prompt}]
            body = {"model": self.model, "messages": messages, "temperature": self.temperature}
            optional = {"max_tokens": self.max_tokens, "reasoning_effort": self.reasoning_effort}
        else:
            body = {"model": self.model, "input": prompt, "temperature": self.temperature, "store": False}
            effort = {"effort": self.reasoning_effort} if self.reasoning_effort is not None else None
            optional = {"max_output_tokens": self.max_tokens, "reasoning": effort}
        body.update((name, value) for name, value in optional.items() if value is not None)
        return body

    def _session(self) -> _Session:
        loop = asyncio.get_running_loop()
        if loop not in self._sessions:
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            http = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), limits=limits)
            self._sessions[loop] = (http, asyncio.Semaphore(self.max_concurrency))
        return self._sessions[loop]

    async def aclose(self) -> None:
        """Close the connections of the running loop (each loop's connections can only be closed on it)."""
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None:
            await session[0].aclose()

    # ---- one attempt, retries -------------------------------------------------------------------------------
    async def complete(self, prompt: str) -> str:
        http, slots = self._session()
        for attempt in range(1, self.max_retries + 1):
            async with slots:
                try:
                    return await self._attempt(http, prompt)
                except JudgeError as err:
                    error = err
            if not error.retryable or attempt == self.max_retries:
                break
            # the package's one policy (qed_lightning.retry): the server's Retry-After, else exponential back-off,
            # bounded by our own per-attempt limit
            delay = backoff_s(attempt, self.backoff_s, self.timeout_s, error.retry_after)
            log.info("judge attempt %d/%d failed (%s); retrying in %.2fs", attempt, self.max_retries, error, delay)
            await asyncio.sleep(delay)
        raise error

    async def _attempt(self, http: httpx.AsyncClient, prompt: str) -> str:
        url = self._endpoint()
        key = self._api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await http.post(url, json=self._payload(prompt), headers=headers)
        except (TimeoutError, httpx.TimeoutException):
            raise JudgeError("timeout", f"POST {url} got no reply within {self.timeout_s}s") from None
        except httpx.TransportError as err:
            raise JudgeError("http", self._redact(f"POST {url} failed: {type(err).__name__}: {err}")) from None
        self._check_status(response, url)
        return self._reply_text(response, url)

    def _check_status(self, response: httpx.Response, url: str) -> None:
        status = response.status_code
        if status < 400:
            return
        detail = self._redact(f"POST {url} returned HTTP {status}: {response.text[:300]}")
        if status == 429:
            raise JudgeError("rate_limited", detail, retry_after=retry_after_s(response.headers), status=status)
        raise JudgeError("http", detail, retryable=retryable_status(status), status=status)

    def _reply_text(self, response: httpx.Response, url: str) -> str:
        try:
            body = response.json()
            unfinished = _chat_unfinished(body) if self.api == "chat" else _responses_unfinished(body)
            if unfinished is not None:
                raise JudgeError("incomplete", f"POST {url}: the judge's reply did not finish ({unfinished}); its "
                                 "text is not a verdict. Raise the judge client's max_tokens if it hit the limit.",
                                 retryable=False, reply=_partial_text(body, self.api))
            text = _chat_text(body) if self.api == "chat" else _responses_text(body)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError, ValueError) as err:
            snippet = self._redact(response.text[:200])
            detail = f"POST {url} returned no {self.api} completion ({err!r}); body starts {snippet!r}"
            raise JudgeError("malformed", detail) from None
        return text


#: chat `finish_reason` values of a reply that stopped before the judge finished it
UNFINISHED_REASONS = ("length", "content_filter")


def _chat_unfinished(body: dict[str, Any]) -> str | None:
    """Why a chat completion did not finish ("finish_reason 'length'"), or None when it finished."""
    reason = body["choices"][0].get("finish_reason")
    return f"finish_reason {reason!r}" if reason in UNFINISHED_REASONS else None


def _responses_unfinished(body: dict[str, Any]) -> str | None:
    """Why a Responses reply did not finish (`status: "incomplete"` and its reason), or None when it finished."""
    messages = [item for item in body.get("output") or [] if item.get("type") == "message"]
    if body.get("status") != "incomplete" and not any(m.get("status") == "incomplete" for m in messages):
        return None
    reason = (body.get("incomplete_details") or {}).get("reason")
    return f"status 'incomplete', reason {reason!r}" if reason else "status 'incomplete'"


def _partial_text(body: dict[str, Any], api: str) -> str:
    """Whatever text an unfinished reply holds ("" when none), for the record only."""
    try:
        return _chat_text(body) if api == "chat" else _responses_text(body)
    except (KeyError, IndexError, TypeError, ValueError):
        return ""


def _chat_text(body: dict[str, Any]) -> str:
    content = body["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise ValueError(f"choices[0].message.content is {type(content).__name__}, not text")
    return content


def _responses_text(body: dict[str, Any]) -> str:
    if isinstance(body.get("output_text"), str) and body["output_text"]:
        return body["output_text"]
    parts = [
        part["text"]
        for item in body["output"]
        if item.get("type") == "message"
        for part in item.get("content") or []
        if part.get("type") == "output_text"
    ]
    if not parts:
        raise ValueError("output holds no message with output_text (reasoning only, or an empty reply)")
    return "".join(parts)
