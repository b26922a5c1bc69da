"""The pool client (`rollout.engines.server_pool.ServerPool`) against fake vLLM servers (plain local HTTP servers that
record every request): both engines push checkpoints through its one `write_checkpoint` + `reload_all`, in the same
order of requests on the wire; generation takes turns over the servers; a failed reload names the server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qed_lightning.rollout import LocalVLLMPool, SamplingConfig, VLLMServerEngine
from qed_lightning.rollout.engines import server_pool
from qed_lightning.rollout.engines.server_pool import GenerateAPI, ServerPool


class _FakeServer(BaseHTTPRequestHandler):
    """Answers what the pool client asks; `seen` records (method, path, body) of every request."""

    seen: list[tuple[str, str, dict]]
    fail: set[str]  # POST paths answered with HTTP 500

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen.append(("GET", self.path, {}))
        self._reply(200, {"data": [{"id": "m"}]} if self.path == "/v1/models" else {})

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        self.seen.append(("POST", self.path, body))
        if self.path in self.fail:
            return self._reply(500, {"error": "injected"})
        if body.get("method") == "model_dtype":
            return self._reply(200, {"results": ["bfloat16"]})
        if self.path == "/v1/completions":
            choice = {"index": 0, "text": "x", "finish_reason": "stop", "token_ids": [7],
                      "logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-0.5]}}
            return self._reply(200, {"choices": [choice]})
        self._reply(200, {})

    def log_message(self, *args):
        pass


@pytest.fixture
def servers():
    """Start fake servers on demand: `servers(k)` -> (their URLs, each one's record of requests)."""
    started = []

    def start(count: int) -> tuple[list[str], list[list]]:
        urls, records = [], []
        for _ in range(count):
            handler = type("Fake", (_FakeServer,), {"seen": [], "fail": set()})
            httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            started.append(httpd)
            urls.append(f"http://127.0.0.1:{httpd.server_address[1]}")
            records.append(handler)
        return urls, records

    yield start
    for httpd in started:
        httpd.shutdown()


def _posts(handler) -> list[str]:
    return [path for method, path, _ in handler.seen if method == "POST"]


TENSORS = [("w", torch.ones(8)), ("b", torch.zeros(2))]


def test_both_engines_push_through_the_one_client_method(servers, tmp_path, monkeypatch):
    """A checkpoint push of `VLLMServerEngine` and of `LocalVLLMPool` is `ServerPool.write_checkpoint` then
    `ServerPool.reload_all` (spied on the class: an engine with a push of its own fails this test): the weights in
    the servers' dtype, then reload + lm_head repack + prefix-cache reset on the wire; the local pool's "keep" mode
    pauses, labels the version and resumes around it."""
    calls = []
    for name in ("write_checkpoint", "reload_all"):
        original = getattr(ServerPool, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, self))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(ServerPool, name, spy)
    (url,), (fake,) = servers(1)

    engine = VLLMServerEngine([url], sync_dir=str(tmp_path / "remote"))
    engine.start()
    assert engine.push_dtype == torch.bfloat16 and engine.model == "m"
    stats = engine.push_weights(iter(TENSORS), 1)
    assert stats["push_bytes"] == 10 * 2  # bf16
    assert [(n, s is engine.servers) for n, s in calls] == [("write_checkpoint", True), ("reload_all", True)]
    reload = [body for _, path, body in fake.seen if body.get("method") == "reload_weights"]
    assert reload == [{"method": "reload_weights", "kwargs": {
        "weights_path": str((tmp_path / "remote" / "v1").resolve()), "is_checkpoint_format": True}}]
    saved = load_file(str(tmp_path / "remote" / "v1" / "model-00001.safetensors"))
    assert saved["w"].dtype == torch.bfloat16
    assert _posts(fake)[-3:] == ["/collective_rpc", "/collective_rpc", "/reset_prefix_cache"]
    engine.close()

    fake.seen.clear()
    calls.clear()
    pool = LocalVLLMPool(cpus=["1"], update_mode="keep", sync_dir=str(tmp_path / "local"))
    pool.servers = ServerPool([url], api=GenerateAPI, log_paths={url: Path("x.log")})  # as `start` composes it
    pool.servers.connect(5.0, poll_s=0.1)
    try:
        stats = pool.push_weights(iter(TENSORS), 4)
        assert stats["push_bytes"] == 10 * 2 and pool.serving_version == 4 == pool.policy_version
        assert [(n, s is pool.servers) for n, s in calls] == [("write_checkpoint", True), ("reload_all", True)]
        assert _posts(fake) == ["/collective_rpc", "/pause?mode=keep", "/collective_rpc", "/collective_rpc",
                                "/reset_prefix_cache", "/update_weight_version", "/resume"]  # after model_dtype
        assert fake.seen[-2][2] == {"new_version": "4"}
    finally:
        pool.close()
    assert not (tmp_path / "local" / "v4").exists()


def test_generation_takes_turns_over_the_servers_and_a_failed_reload_names_its_server(servers, tmp_path):
    urls, fakes = servers(2)
    pool = ServerPool(urls, max_retries=1)
    pool.connect(5.0, poll_s=0.1, ask_dtype=False)
    sampling = SamplingConfig(max_new_tokens=4, seed=0)
    groups = pool.generate([[1], [2], [3]], sampling, n=1, version=5)
    assert [g[0].completion_ids for g in groups] == [[7]] * 3 and groups[0][0].policy_version == 5
    assert [_posts(f).count("/v1/completions") for f in fakes] == [2, 1]
    pool.generate([[4]], sampling, n=1, version=5)  # the next call goes on where the last one stopped
    assert [_posts(f).count("/v1/completions") for f in fakes] == [2, 2]

    fakes[1].fail.add("/collective_rpc")
    with pytest.raises(RuntimeError, match=rf"rollout server {urls[1]} failed to load weight version v3 from "):
        pool.reload_all(tmp_path, 3)
    pool.log_paths = {urls[1]: Path("/logs/s1.log")}
    with pytest.raises(RuntimeError, match=r"vLLM server .* \(log /logs/s1.log\) failed to load weight version"):
        pool.reload_all(tmp_path, 3)
    pool.close()
    assert not pool.connected


def test_the_generate_route_reports_the_versions_of_a_sample():
    choice = {"token_ids": [5, 6], "logprobs": {"content": [{"logprob": -0.1}, {"logprob": -0.2}]},
              "weight_versions": [{"version": "1"}, {"version": "2"}], "finish_reason": "length", "text": "ab"}
    c = GenerateAPI.parse([1], choice, version=0)
    assert (c.completion_ids, c.logprobs, c.policy_version, c.end_version, c.truncated) == (
        [5, 6], [-0.1, -0.2], 1, 2, True)
    body = GenerateAPI.body("m", [1, 2], SamplingConfig(top_k=0), 3, seed=None)
    assert body["token_ids"] == [1, 2] and body["sampling_params"]["top_k"] == -1 and "seed" not in body[
        "sampling_params"]
    assert server_pool.resolve_urls(["http://a:1/v1/"]) == ["http://a:1"]


def test_a_server_serving_another_model_is_refused_naming_it_and_what_it_serves(servers):
    urls, records = servers(2)

    def serves_other(handler) -> None:
        handler._reply(200, {"data": [{"id": "other"}]} if handler.path == "/v1/models" else {})

    records[1].do_GET = serves_other  # the second server serves another model
    pool = ServerPool(urls)
    with pytest.raises(ValueError) as err:
        pool.connect(startup_timeout_s=10, poll_s=0.1)
    pool.close()
    assert f"rollout servers do not serve 'm': {urls[1]} serves ['other']" in str(err.value)
    assert urls[0] not in str(err.value) and "--served-model-name" in str(err.value)
