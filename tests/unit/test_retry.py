"""The one HTTP retry policy (`qed_lightning.retry`), through the rollout server pool client's requests against a
real local HTTP server: 429 and 5xx are retried after the server's Retry-After, another 4xx is not."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from qed_lightning.retry import backoff_s
from qed_lightning.rollout.engines.server_pool import ServerPool


class _Scripted(BaseHTTPRequestHandler):
    replies: list[tuple[int, dict]] = []  # (status, headers) per request, in order; then 200
    seen: list[int] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        status, headers = self.replies.pop(0) if self.replies else (200, {})
        type(self).seen.append(status)  # before replying: the client may check `seen` as soon as it has the reply
        body = json.dumps({"ok": status == 200}).encode()
        self.send_response(status)
        for name, value in {**headers, "content-type": "application/json"}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Scripted.seen = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _engine(retries: int) -> ServerPool:
    pool = ServerPool(["http://unused:8000"], max_retries=retries)
    pool.client = httpx.Client(timeout=10.0)
    return pool


def test_rate_limits_and_server_errors_are_retried_after_retry_after(server):
    _Scripted.replies = [(429, {"retry-after": "0"}), (503, {"retry-after": "0"})]
    assert _engine(retries=3).post(f"{server}/v1/completions", {}) == {"ok": True}
    assert _Scripted.seen == [429, 503, 200]


def test_a_client_error_is_not_retried_and_the_last_failure_is_named(server):
    _Scripted.replies = [(400, {})]
    with pytest.raises(httpx.HTTPStatusError, match="400"):
        _engine(retries=3).post(f"{server}/v1/completions", {})
    assert _Scripted.seen == [400]
    _Scripted.seen, _Scripted.replies = [], [(500, {"retry-after": "0"})] * 2
    with pytest.raises(RuntimeError, match=r"failed after 2 attempts: HTTP 500"):
        _engine(retries=2).post(f"{server}/v1/completions", {})
    assert _Scripted.seen == [500, 500]


def test_backoff_without_retry_after_doubles_up_to_the_cap():
    assert [backoff_s(k, 2.0, 30.0) for k in range(1, 6)] == [2.0, 4.0, 8.0, 16.0, 30.0]
    assert backoff_s(1, 2.0, 30.0, retry_after=120.0) == 30.0  # a server's hint is bounded too
