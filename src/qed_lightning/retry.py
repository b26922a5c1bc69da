"""One retry policy for every HTTP client of the package: the judge clients (`rewards.clients`) and the rollout
server pool client (`rollout.engines.server_pool`).

What is retried: connection errors, timeouts, HTTP 429 (rate limited) and 5xx; never another 4xx (the request itself
is wrong, and sending it again gives the same answer). How long to wait before attempt k + 1: the server's
`Retry-After` when it sent one, else `base_s * 2^(k - 1)`; either way at most `max_s`. The attempts per request are
each client's `max_retries`. (The `openai` SDK does the same for its own calls; ours speak both the chat and the
completions protocols over plain `httpx`, so they share this instead.)

No framework import.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["backoff_s", "retry_after_s", "retryable_status"]


def retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth another attempt (429 and 5xx).

    >>> [retryable_status(s) for s in (200, 400, 404, 429, 500, 503)]
    [False, False, False, True, True, True]
    """
    return status == 429 or status >= 500


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The `Retry-After` header in seconds (a number; the HTTP-date form is not used by the servers we call), or None.

    >>> retry_after_s({"retry-after": "3"}), retry_after_s({}), retry_after_s({"retry-after": "soon"})
    (3.0, None, None)
    """
    try:
        return max(0.0, float(headers.get("retry-after", "")))
    except ValueError:
        return None


def backoff_s(attempt: int, base_s: float, max_s: float, retry_after: float | None = None) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): the server's `retry_after` when given, else
    `base_s * 2^(attempt - 1)`; at most `max_s`.

    >>> [backoff_s(k, 2.0, 30.0) for k in (1, 2, 3, 5)], backoff_s(1, 2.0, 30.0, retry_after=7.0)
    ([2.0, 4.0, 8.0, 30.0], 7.0)
    """
    wait = retry_after if retry_after is not None else base_s * 2 ** (attempt - 1)
    return min(wait, max_s)
