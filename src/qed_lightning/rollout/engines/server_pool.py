"""The client side of a set of vLLM OpenAI-compatible servers: everything that talks to them over HTTP.

Why a module of its own: the pool client talks to servers (waiting for them, requests with the package's retry policy,
round-robin generation, the one checkpoint push: write, then reload on every server); the engines are what the
trainer sees (`server_engine.VLLMServerEngine` over servers started elsewhere, with its checkpoint or NCCL sync);
`local_pool.LocalVLLMPool` also owns the server processes, and composes a `ServerPool` over the ones it started.
Both engines push checkpoints through the same `ServerPool.write_checkpoint` and `ServerPool.reload_all`.

Two request formats (`api`): `/v1/completions` (`CompletionsAPI`, any vLLM server: token ids in, log-prob of each
sampled token and its id out) and vLLM's token-in/token-out `/inference/v1/generate` (`GenerateAPI`, servers started
with `--enable-scale-out`), which labels every sampled token with the weight version that produced it.

In-flight updates (`update_mode` of `reload_all`): with requests still running on the servers (a streaming generator
never stops), a reload must not swap weights under a forward pass. "wait" pauses each server with vLLM's
`/pause?mode=wait` (running requests finish on the weights they started with, new ones queue), reloads and resumes:
exact per-sample versions; "keep" (`/pause?mode=keep`, PipelineRL's in-flight update) freezes the running requests,
reloads, and lets them continue on the new weights (a sample may mix two versions). Either way the servers'
weight-version label is set (`/update_weight_version`), which `/inference/v1/generate` reports per token. "none"
reloads without pausing: only safe when nothing is generating (`AsyncRollouts` waits for its batch).
Tied lm_head: an in-place reload of a tied checkpoint leaves a stale pre-packed lm_head on vLLM's CPU backend (see
`vllm_engine._refresh_tied_lm_head`), and a reload *from a path* through `/collective_rpc` has the same problem
(found by tests/integration/test_disaggregated.py: after a sync the server's log-probs matched the new body with the
old output embeddings to 1e-6). vLLM skips `lm_head.weight` of tied models, so writing it into the checkpoint does
not help; after each reload the client calls the `refresh_tied_lm_head` RPC of our worker extension, which repacks
the head (a no-op on GPU). Without the extension it warns once per server and carries on.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from torch import Tensor

from qed_lightning.parallel.distributed import rank, world_size
from qed_lightning.retry import backoff_s, retry_after_s, retryable_status
from qed_lightning.rollout.base import Completion, SamplingConfig
from qed_lightning.rollout.pool_sync import write_safetensors

log = logging.getLogger(__name__)

WORKER_EXTENSION = "qed_lightning.rollout.engines.vllm_worker.QEDWorkerExtension"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, on `host` ("" = every interface)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def resolve_urls(entries: list[str]) -> list[str]:
    """Server roots from `entries`: plain URLs, `env:VAR` (comma- or space-separated URLs in $VAR) or `file:PATH`
    (one URL a line, as scripts/slurm/vllm_pool.sbatch writes). A trailing /v1 is dropped.

    >>> resolve_urls(["http://a:8000/v1", "http://b:8001/"])
    ['http://a:8000', 'http://b:8001']
    """
    urls: list[str] = []
    for entry in entries:
        if entry.startswith("env:"):
            value = os.environ.get(entry[4:], "").strip()
            if not value:
                raise ValueError(f"engine.urls entry {entry!r}: ${entry[4:]} is not set (export the pool's URLs)")
            urls += value.replace(",", " ").split()
        elif entry.startswith("file:"):
            path = Path(entry[5:])
            if not path.exists():
                raise ValueError(f"engine.urls entry {entry!r}: {path} does not exist (the pool job writes it)")
            urls += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            urls.append(entry)
    return [u.rstrip("/").removesuffix("/v1") for u in urls]


def _knobs(sampling: SamplingConfig, n: int) -> dict:
    """Every sampling knob pinned: no server-side default (generation_config.json) can change the law."""
    return {"n": n, "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "top_k": sampling.top_k if sampling.top_k > 0 else -1, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": 0,
            "skip_special_tokens": True}


class CompletionsAPI:
    """`/v1/completions` with the log-prob of each sampled token (`logprobs: 0`) and the token ids themselves."""

    path = "/v1/completions"

    @staticmethod
    def body(model: str | None, prompt: list[int], sampling: SamplingConfig, n: int, seed: int | None) -> dict:
        body = {"model": model, "prompt": list(prompt), **_knobs(sampling, n), "return_tokens_as_token_ids": True,
                "return_token_ids": True}
        if seed is not None:
            body["seed"] = seed
        return body

    @staticmethod
    def parse(prompt: list[int], choice: dict, version: int) -> Completion:
        logprobs = choice["logprobs"]
        ids = choice.get("token_ids")
        if ids is None:  # older servers: "token_id:123" strings (return_tokens_as_token_ids)
            ids = [int(t.rsplit(":", 1)[1]) for t in logprobs["tokens"]]
        lps = [float(x) for x in logprobs["token_logprobs"]]
        if len(lps) != len(ids):
            raise ValueError(f"server returned {len(ids)} tokens but {len(lps)} log-probs")
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(list(prompt), list(ids), lps, finish, choice.get("text", ""), version)


class GenerateAPI:
    """vLLM's `/inference/v1/generate` (`--enable-scale-out`): token ids in and out, and the weight versions each
    sample's tokens were sampled with."""

    path = "/inference/v1/generate"

    @staticmethod
    def body(model: str | None, prompt: list[int], sampling: SamplingConfig, n: int, seed: int | None) -> dict:
        params = _knobs(sampling, n)
        if seed is not None:
            params["seed"] = seed
        return {"model": model, "token_ids": list(prompt), "sampling_params": params, "output_mode": "text"}

    @staticmethod
    def parse(prompt: list[int], choice: dict, version: int) -> Completion:
        """Token ids, their log-probs, text, and the versions of the first and last token (`version`, the
        client's, when the server reports none)."""
        ids = [int(t) for t in choice["token_ids"]]
        lps = [float(entry["logprob"]) for entry in (choice.get("logprobs") or {}).get("content") or []]
        if len(lps) != len(ids):
            raise ValueError(f"server returned {len(ids)} tokens but {len(lps)} log-probs")
        spans = [int(s["version"]) for s in choice.get("weight_versions") or [] if str(s["version"]).isdigit()]
        first, last = (spans[0], spans[-1]) if spans else (version, version)
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(list(prompt), ids, lps, finish, choice.get("text", ""), first,
                          end_version=last if last != first else None)


def remove_versions_before(sync_dir: Path, version: int) -> None:
    """Remove the pushed versions `sync_dir/v<N>` older than `version` (once every server has loaded a newer one)."""
    for old in sync_dir.glob("v*"):
        if old.is_dir() and old.name[1:].isdigit() and int(old.name[1:]) < version:
            shutil.rmtree(old, ignore_errors=True)


class ServerPool:
    """HTTP client of a set of vLLM servers (see the module docstring).

    Args:
        urls: server roots, or `env:VAR` / `file:PATH` entries resolved by `connect` (see `resolve_urls`).
        model: served model name; None = the first name `/v1/models` lists.
        timeout_s: per request. max_concurrency: requests in flight per training rank. max_retries: attempts per
            request on connection errors, timeouts, 429 and 5xx.
        api: the generation route, `CompletionsAPI` or `GenerateAPI`.
        log_paths: each server's log file, by URL, for servers this process started (named in errors).
    """

    def __init__(self, urls: list[str], model: str | None = None, timeout_s: float = 3600.0,
                 max_concurrency: int = 64, max_retries: int = 3, api: type = CompletionsAPI,
                 log_paths: dict[str, Path] | None = None) -> None:
        self.entries = list(urls)
        self.urls = [] if any(u.startswith(("env:", "file:")) for u in urls) else resolve_urls(urls)
        self.model, self.api, self.log_paths = model, api, log_paths
        self.timeout_s, self.max_concurrency, self.max_retries = timeout_s, max_concurrency, max_retries
        self.client: httpx.Client | None = None
        self.push_dtype: torch.dtype | None = None  # the servers' dtype (asked by `connect`): pushes are cast to it
        self._turn = 0
        self._rank, self._world = 0, 1
        self._no_extension: set[str] = set()

    # -- connection ----------------------------------------------------------------------------------------------

    def connect(self, startup_timeout_s: float, poll_s: float = 2.0, check_started: Callable[[], None] | None = None,
                ask_dtype: bool = True) -> None:
        """Resolve the URLs, wait for every server (`check_started` may raise meanwhile: a server known to be gone),
        resolve the served model name and, with `ask_dtype`, the servers' dtype."""
        self.urls = resolve_urls(self.entries)
        self._rank, self._world = rank(), world_size()
        self.client = httpx.Client(timeout=self.timeout_s, limits=httpx.Limits(max_connections=self.max_concurrency))
        names = [self._wait_ready(url, startup_timeout_s, poll_s, check_started) for url in self.urls]
        self.model = self.model or names[0][0]
        missing = {u: served for u, served in zip(self.urls, names) if self.model not in served}
        if missing:
            raise ValueError(f"rollout servers do not serve {self.model!r}: "
                             + ", ".join(f"{u} serves {served}" for u, served in missing.items())
                             + "; every server of a pool serves one model name (vLLM's --served-model-name), set as "
                             "the engine's `model` (unset: the first server's)")
        self.push_dtype = self._serving_dtype() if ask_dtype else None
        log.info("rollout pool ready: %d server(s) serving %s in %s", len(self.urls), self.model,
                 self.push_dtype or "an unknown dtype (pushes keep the trainer's)")

    @property
    def connected(self) -> bool:
        return self.client is not None

    def _wait_ready(self, url: str, timeout_s: float, poll_s: float, check_started) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            if check_started is not None:
                check_started()
            try:
                reply = self.client.get(f"{url}/v1/models", timeout=10.0)
                if reply.status_code == 200:
                    return [m["id"] for m in reply.json()["data"]]
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout server {url} did not answer /v1/models within {timeout_s:.0f}s")
            time.sleep(poll_s)

    def _serving_dtype(self) -> torch.dtype | None:
        """The dtype of the first server's weights, through our worker extension's `model_dtype` RPC (None without
        it: pushes then keep the trainer's dtype, which the server casts on load)."""
        reply = self.client.post(f"{self.urls[0]}/collective_rpc", json={"method": "model_dtype"})
        if reply.status_code != 200:
            log.warning("%s has no qed worker extension (--worker-extension-cls %s): weights are pushed in the "
                        "trainer's dtype (fp32 master weights: twice the bytes of a bf16 server)", self.urls[0],
                        WORKER_EXTENSION)
            return None
        return getattr(torch, reply.json()["results"][0])

    def describe(self, url: str) -> str:
        """How errors name a server (with its log file when this process started it)."""
        if self.log_paths is None:
            return f"rollout server {url}"
        return f"vLLM server {url} (log {self.log_paths.get(url, 'unknown')})"

    def check_alive(self, stalled_s: float | None, version: int) -> None:
        """Raise naming the first server that refuses connections (`/health`); with `stalled_s`, a TimeoutError
        naming the servers the caller waited on (see `RolloutEngine.check_alive`). `version`: the weights served."""
        for url in self.urls:
            try:
                httpx.get(f"{url}/health", timeout=30.0)
            except httpx.ConnectError as err:
                raise RuntimeError(f"{self.describe(url)} is gone (weight version {version}): {err}") from err
            except httpx.TimeoutException:
                pass  # busy is not dead; a stall is the caller's `stalled_s`
        if stalled_s is not None:
            servers = ", ".join(self.describe(url) for url in self.urls)
            raise TimeoutError(f"no rollout came back for {stalled_s:.0f} s from {servers} (weight version "
                               f"{version})")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # -- requests ------------------------------------------------------------------------------------------------

    def post(self, url: str, body: dict) -> dict:
        """POST with the package's retry policy (`qed_lightning.retry`): connection errors, timeouts, 429 and 5xx are
        retried after the server's Retry-After or an exponential back-off (2 s, 4 s, ..., at most 30 s)."""
        for attempt in range(1, self.max_retries + 1):
            wait_hint = None
            try:
                reply = self.client.post(url, json=body)
                if not retryable_status(reply.status_code):
                    reply.raise_for_status()
                    return reply.json() if reply.content else {}
                error: Exception = httpx.HTTPStatusError(f"HTTP {reply.status_code}: {reply.text[:300]}",
                                                         request=reply.request, response=reply)
                wait_hint = retry_after_s(reply.headers)
            except (httpx.TransportError, httpx.TimeoutException) as err:
                error = err
            if attempt == self.max_retries:
                raise RuntimeError(f"{url} failed after {attempt} attempts: {error}") from error
            time.sleep(backoff_s(attempt, 2.0, 30.0, wait_hint))
        raise AssertionError("unreachable")

    def request_body(self, prompt: list[int], sampling: SamplingConfig, n: int, seed: int | None) -> dict:
        return self.api.body(self.model, prompt, sampling, n, seed)

    def parse_choice(self, prompt: list[int], choice: dict, version: int) -> Completion:
        return self.api.parse(prompt, choice, version)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, n: int,
                 version: int) -> list[list[Completion]]:
        """`n` samples of each prompt, labelled `version` (unless the server reports its own)."""
        # prompt i of rank r is the (r + W i)-th of the step over all ranks: the pool's servers take turns
        turn, self._turn = self._turn, self._turn + self._world * len(prompts)

        def one(i: int) -> list[Completion]:
            url = self.urls[(turn + self._rank + self._world * i) % len(self.urls)]
            body = self.request_body(prompts[i], sampling, n, sampling.prompt_seed(i))
            reply = self.post(f"{url}{self.api.path}", body)
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            return [self.parse_choice(prompts[i], c, version) for c in choices]

        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(one, range(len(prompts))))

    # -- the checkpoint push -------------------------------------------------------------------------------------

    def write_checkpoint(self, named_tensors: Iterable[tuple[str, Tensor]], sync_dir: Path, version: int,
                         shard_bytes: int = 2**30) -> tuple[Path | None, int]:
        """Write the weights in the servers' dtype to `sync_dir/v<version>` on rank 0 (the other ranks only walk
        them: a sharded trainer gathers each parameter collectively); returns the folder (None on other ranks) and
        the bytes written. Then `reload_all` (rank 0) and `remove_versions_before`."""
        target = (sync_dir / f"v{version}").resolve() if rank() == 0 else None
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)  # a leftover of an earlier run must not mix in
        return target, write_safetensors(named_tensors, target, shard_bytes, self.push_dtype)

    def reload_all(self, path: Path, version: int | None = None, update_mode: str = "none") -> None:
        """Reload every server from `path` (pausing it first unless `update_mode` is "none") and label its weights
        `version`."""
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(path), "is_checkpoint_format": True}}

        def one(url: str) -> None:
            try:
                if update_mode != "none":
                    self.post(f"{url}/pause?mode={update_mode}", {})
                try:
                    self.post(f"{url}/collective_rpc", rpc)
                    self._refresh_tied_lm_head(url)
                    self.post(f"{url}/reset_prefix_cache", {})  # refused (harmlessly) while "keep" holds requests
                    if version is not None and update_mode != "none":
                        self.post(f"{url}/update_weight_version", {"new_version": str(version)})
                finally:
                    if update_mode != "none":
                        self.post(f"{url}/resume", {})
            except Exception as err:
                raise RuntimeError(f"{self.describe(url)} failed to load weight version "
                                   f"{'v' + str(version) if version is not None else path.name} from {path}: "
                                   f"{err}") from err

        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            list(pool.map(one, self.urls))

    def label_version(self, version: int) -> None:
        """Label every server's weights `version` (without a reload: the starting weights)."""
        for url in self.urls:
            self.post(f"{url}/update_weight_version", {"new_version": str(version)})

    def _refresh_tied_lm_head(self, url: str) -> None:
        """Repack a tied lm_head after the reload (the CPU backend keeps the old one otherwise; found by the test)."""
        if url in self._no_extension:
            return
        reply = self.client.post(f"{url}/collective_rpc", json={"method": "refresh_tied_lm_head"})
        if reply.status_code != 200:
            self._no_extension.add(url)
            log.warning("%s has no qed worker extension (start it with --worker-extension-cls %s): a tied lm_head is "
                        "not repacked after reloads, which leaves CPU servers sampling from stale output embeddings "
                        "(GPU servers are unaffected)", url, WORKER_EXTENSION)
