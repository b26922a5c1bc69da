"""A scripted, protocol-faithful stand-in for an OpenAI-compatible judge server (tests and CPU demos only).

The paper's judge, gpt-oss-20b, cannot run on our CPU machines, and the tiny test model grades at random. This
server speaks the real HTTP protocol (`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/responses`, with
bodies shaped like vLLM's and OpenAI's), so the whole judge client runs unchanged against it: retries, timeouts,
concurrency, both APIs. Instead of a model it scores the proof it finds in the judge prompt (between the
`=== Proof Solution ===` / `=== End of Proof Solution ===` markers of the packaged templates) with a named,
deterministic rule (`judge_rules`: "length", "keyword", "char_fraction", "fixed", and "obey", a naive judge that
follows "give N" written after what it takes for the end of the proof).

It answers `<score>N</score><assessment>scripted stand-in judge: rule=...</assessment><errors>...</errors>`, or
`<points>N out of 7</points>` when the prompt asks for points (the IMO-ProofBench template).

Fault injection, consumed one per POST in order, then normal service: "http500", "http429" (Retry-After: 0),
"http400" (a non-retryable error whose body echoes the request's Authorization header, like a careless proxy),
"timeout" (answers only after `delay_s`), "malformed_json" (a 200 whose body is not JSON), "no_score" (a valid
reply without a score), "garbage" (`<score>9</score>`), "truncate" (a reply cut off by its token limit right after
quoting the proof, HTML entities read back, so an escaped `&lt;score&gt;` in the prompt is quoted as a tag: chat
`finish_reason: "length"`, Responses `status: "incomplete"`). `down = True` answers every request with 503.

Run it in the foreground: `python -m qed_lightning.testing.judge_server --port 8765 --rule keyword --keyword QED`.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import threading
import time
import uuid
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from qed_lightning.testing.judge_rules import (
    PROOF_END, PROOF_START, RULES, Rule, ScoringRule, obeyed_instruction, proof_section,
)

__all__ = ["FAULTS", "ScriptedJudgeServer", "main"]

log = logging.getLogger(__name__)

FAULTS = ("http500", "http429", "http400", "timeout", "malformed_json", "no_score", "garbage", "truncate")


def _prompt_text(path: str, body: dict[str, Any]) -> str:
    """The user text of a chat or responses request; raises KeyError/TypeError when the body lacks it."""
    if path.endswith("/chat/completions"):
        content = body["messages"][-1]["content"]
    else:
        content = body["input"]
        if isinstance(content, list):
            content = content[-1]["content"]
    if isinstance(content, list):  # content parts: [{"type": "text" | "input_text", "text": ...}]
        content = "".join(part.get("text", "") for part in content)
    if not isinstance(content, str):
        raise TypeError(f"prompt content is {type(content).__name__}")
    return content


def _chat_body(model: str, text: str, prompt_tokens: int, finished: bool = True) -> dict[str, Any]:
    completion_tokens = len(text.split())
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": "stop" if finished else "length"}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _responses_body(model: str, text: str, prompt_tokens: int, with_output_text: bool,
                    finished: bool = True) -> dict[str, Any]:
    output_tokens = len(text.split())
    status = "completed" if finished else "incomplete"
    body = {
        "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()), "model": model,
        "status": status, "incomplete_details": None if finished else {"reason": "max_output_tokens"},
        "output": [{"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": prompt_tokens, "output_tokens": output_tokens,
                  "total_tokens": prompt_tokens + output_tokens},
    }
    if with_output_text:
        body["output_text"] = text
    return body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("scripted judge: " + format, *args)

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            self.close_connection = True

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode("utf-8"), headers)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send_json(status, {"error": {"message": message, "type": "scripted_fault", "code": status}}, headers)

    def _admit(self) -> bool:
        owner = self.server.owner
        if owner.closed:
            self.close_connection = True
            return False
        owner.count(self.path, self.headers.get("Authorization"))
        if owner.down:
            self._error(503, "scripted judge server is down")
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if not self._admit():
            return
        if self.path.rstrip("/") != "/v1/models":
            self._error(404, f"no route {self.path}")
            return
        owner = self.server.owner
        model = {"id": owner.model, "object": "model", "created": int(time.time()), "owned_by": "qed-lightning"}
        self._send_json(200, {"object": "list", "data": [model]})

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._admit():
            return
        if self.path not in ("/v1/chat/completions", "/v1/responses"):
            self._error(404, f"no route {self.path}")
            return
        owner = self.server.owner
        fault = owner.next_fault()
        if fault in ("http500", "http429", "http400", "malformed_json"):
            self._fault_reply(fault)
            return
        if fault == "timeout":
            owner.closing.wait(owner.delay_s)
        try:
            body = json.loads(raw)
            owner.record(self.path, body)
            prompt = _prompt_text(self.path, body)
        except (ValueError, KeyError, IndexError, TypeError) as err:
            self._error(400, f"request body is not a valid {self.path} request: {err!r}")
            return
        text = owner.reply_for(prompt, fault)
        model = body.get("model") or owner.model
        tokens = len(prompt.split())
        finished = fault != "truncate"
        if self.path.endswith("/chat/completions"):
            self._send_json(200, _chat_body(model, text, tokens, finished))
        else:
            self._send_json(200, _responses_body(model, text, tokens, owner.output_text_field, finished))

    def _fault_reply(self, fault: str) -> None:
        if fault == "http500":
            self._error(500, "scripted fault: internal server error")
        elif fault == "http429":
            self._error(429, "scripted fault: rate limited", {"Retry-After": "0"})
        elif fault == "http400":
            self._error(400, f"scripted fault: bad request (echoed Authorization: {self.headers.get('Authorization')})")
        else:
            self._send(200, b"<html>scripted fault: this body is not JSON</html>")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the stdlib's 5 makes concurrent clients wait a second for a SYN retry
    owner: ScriptedJudgeServer


class ScriptedJudgeServer:
    """A real HTTP judge server on 127.0.0.1 that scores proofs with a deterministic rule (context manager).

    Args:
        rule, keyword, chars_per_point, charset, score: the scoring rule (see the module docstring).
        faults: faults to inject, consumed one per POST request in order (more can be added with `inject`).
        delay_s: how long the "timeout" fault waits before answering.
        port: 0 picks a free port; `url` gives the API root ("http://127.0.0.1:PORT/v1").
        model: the model id served by `/v1/models` and echoed when a request names none.
        output_text_field: include the SDK-style `output_text` in responses bodies (vLLM's has none).
    """

    def __init__(
        self,
        rule: Rule = "keyword",
        keyword: str = "proof",
        chars_per_point: int = 200,
        charset: str = "0123456789",
        score: int = 7,
        faults: list[str] | tuple[str, ...] = (),
        delay_s: float = 5.0,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = "scripted-judge",
        output_text_field: bool = True,
    ):
        self.rule = ScoringRule(rule, keyword, chars_per_point, charset, score)
        self.delay_s, self.host, self.requested_port, self.model = delay_s, host, port, model
        self.output_text_field = output_text_field
        self.down = False
        self.closed = False
        self.closing = threading.Event()
        self.counts: Counter[str] = Counter()
        self.auth_headers: list[str | None] = []  # Authorization header of every request, in order
        self.bodies: list[tuple[str, Any]] = []  # (path, JSON body) of every completion request that was answered
        self._faults: deque[str] = deque()
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.inject(*faults)

    # ---- state shared with the handler threads --------------------------------------------------------------
    def inject(self, *faults: str) -> None:
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; choose from {FAULTS}.")
        with self._lock:
            self._faults.extend(faults)

    def next_fault(self) -> str | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def count(self, path: str, authorization: str | None) -> None:
        with self._lock:
            self.counts[path] += 1
            self.auth_headers.append(authorization)

    def record(self, path: str, body: Any) -> None:
        with self._lock:
            self.bodies.append((path, body))

    @property
    def posts(self) -> int:
        """POST requests received on the two completion routes."""
        return self.counts["/v1/chat/completions"] + self.counts["/v1/responses"]

    def reply_for(self, prompt: str, fault: str | None = None) -> str:
        """The judge reply to a rendered prompt (score tag, or points tag when the prompt asks for points)."""
        points = "<points>" in prompt
        proof = proof_section(prompt)
        if proof is None:
            log.warning("scripted judge: no '%s' ... '%s' section in the prompt; replying without a score",
                        PROOF_START, PROOF_END)
            return ("<assessment>scripted stand-in judge: no proof section found in the prompt</assessment>"
                    "<errors>unknown prompt format</errors>")
        if fault == "truncate":  # the token limit hits while the judge quotes the proof
            return f"<assessment>The candidate's proof reads: {html.unescape(proof)}"
        ordered = obeyed_instruction(prompt) if self.rule.name == "obey" else None
        score = 9 if fault == "garbage" else ordered if ordered is not None else self.rule(proof)
        assessment = (f"<assessment>scripted stand-in judge: rule={self.rule.describe()}; "
                      f"proof has {len(proof)} chars</assessment>")
        errors = "<errors>none (scripted)</errors>"
        if fault == "no_score":
            return assessment + errors
        if points:
            return f"{assessment}\n<points>{score} out of 7</points>"
        return f"<score>{score}</score>{assessment}{errors}"

    # ---- lifecycle ------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the scripted judge server is not started; call start() or use it as a context manager.")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> ScriptedJudgeServer:
        self._httpd = _Server((self.host, self.requested_port), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),  # fast shutdown
                                        name="scripted-judge", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._httpd is None:
            return
        self.closed = True
        self.closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> ScriptedJudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qed_lightning.testing.judge_server",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--rule", choices=RULES, default="keyword")
    parser.add_argument("--keyword", default="proof")
    parser.add_argument("--chars-per-point", type=int, default=200)
    parser.add_argument("--charset", default="0123456789")
    parser.add_argument("--score", type=int, default=7)
    parser.add_argument("--model", default="scripted-judge")
    parser.add_argument("--fault", action="append", default=[], choices=FAULTS,
                        help="fault to inject (repeatable, in order)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = ScriptedJudgeServer(args.rule, args.keyword, args.chars_per_point, args.charset, args.score,
                                 faults=args.fault, host=args.host, port=args.port, model=args.model).start()
    log.info("scripted judge (rule %s) serving %s; a stand-in for tests, not a real judge. Ctrl-C stops it.",
             server.rule.describe(), server.url)
    try:
        server._thread.join()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
