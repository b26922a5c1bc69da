"""Disaggregated rollouts: the policy served by a pool of OpenAI-compatible vLLM servers, addressed by URL.

Paper (PipelineRL): 24 of 32 GPUs run vLLM servers that generate while 8 GPUs train; new weights are pushed to the
servers after every optimizer step. Here each training rank sends its prompts to the pool (the servers take turns,
over the prompts of all training ranks) as token ids on `/v1/completions`, with the log-prob of each sampled
token (`logprobs: 0`) and the token ids themselves (`return_token_ids`, `return_tokens_as_token_ids`). Sampling is
seeded per prompt, so a prompt's samples do not depend on the server it lands on.

Start every server of the pool with the trainer's starting weights and:

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model runs/sft/hf \\
        --logprobs-mode processed_logprobs --generation-config vllm --max-model-len 53248 --port 8000 \\
        --worker-extension-cls qed_lightning.rollout.engines.vllm_worker.QEDWorkerExtension

- `--logprobs-mode processed_logprobs` (required): log-probs under the sampling temperature, the convention of
  the trainer's `token_logprobs(..., temperature)`; the default (raw) is off by ~0.3 nats a token at T=0.8 (SPEC 7).
- `--generation-config vllm`: ignore the checkpoint's generation_config.json sampling defaults (Qwen3 ships
  top_k=20, top_p=0.95), which would truncate the distribution; requests also pass every knob explicitly.
- `VLLM_SERVER_DEV_MODE=1` (checkpoint sync): enables `/collective_rpc` and `/reset_prefix_cache`.
- `--worker-extension-cls ...QEDWorkerExtension` (checkpoint sync, needed on CPU servers): adds the
  `refresh_tied_lm_head` RPC, see below.
- `--weight-transfer-config '{"backend": "nccl"}'` (NCCL sync, GPU): enables vLLM's weight-transfer API.
- `--no-enable-chunked-prefill --max-num-batched-tokens <>= max-model-len>` (CPU servers only): requests are
  seeded, and vLLM's CPU backend crashes ("CPU Generator does not use offset") when it prefills a seeded request
  in part (see `vllm_engine`); GPU generators support the rewind, so GPU pools keep chunked prefill.

Weight sync, after every optimizer step (`WeightSyncCallback` calls `load_weights`):
- `sync: checkpoint` (works everywhere, tested on CPU): every trainer rank walks the parameters (a sharded trainer
  gathers them one at a time); rank 0 streams them into safetensors shards of `shard_bytes` in `sync_dir/v<N>` (a
  directory every server can read: shared file system), then each server runs `reload_weights` from it through
  `POST /collective_rpc` and drops its prefix cache. At most one shard is held in memory.
- `sync: nccl` (GPU clusters; not testable on CPU): vLLM's own trainer-side weight transfer
  (`NCCLTrainerWeightTransferEngine`): one NCCL group spans trainer rank 0 and the workers of every server; each
  parameter is gathered once (FSDP2 DTensor, ZeRO-3 partition) and broadcast once to all servers
  (`rollout.pool_sync`); no file system involved.
In-flight updates (`update_mode`): with requests still running on the servers (a streaming generator never stops),
a reload must not swap weights under a forward pass. "wait" pauses each server with vLLM's `/pause?mode=wait`
(running requests finish on the weights they started with, new ones queue), reloads and resumes: exact per-sample
versions; "keep" (`/pause?mode=keep`, PipelineRL's in-flight update) freezes the running requests, reloads, and lets
them continue on the new weights (a sample may mix two versions). Either way the servers' weight-version label is
set (`/update_weight_version`), which `/inference/v1/generate` reports per token (`rollout.local_pool`). "none"
(default) reloads without pausing: only safe when nothing is generating (`AsyncRollouts` waits for its batch).
Tied lm_head: an in-place reload of a tied checkpoint leaves a stale pre-packed lm_head on vLLM's CPU backend (see
`vllm_engine._refresh_tied_lm_head`), and a reload *from a path* through `/collective_rpc` has the same problem
(found by tests/integration/test_disaggregated.py: after a sync the server's log-probs matched the new body with the
old output embeddings to 1e-6). vLLM skips `lm_head.weight` of tied models, so writing it into the checkpoint does
not help; after each reload the engine calls the `refresh_tied_lm_head` RPC of our worker extension, which repacks
the head (a no-op on GPU). Without the extension it warns once per server and carries on.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import httpx
import torch
from torch import Tensor

from qed_lightning.parallel.distributed import barrier, rank, world_size
from qed_lightning.retry import backoff_s, retry_after_s, retryable_status
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.rollout.pool_sync import PoolWeightSyncClient, full_parameter_source, write_safetensors

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


class VLLMServerEngine(RolloutEngine):
    """A pool of vLLM OpenAI-compatible servers as the rollout engine (see the module docstring for server flags).

    Args:
        urls: server roots, e.g. ["http://gpu-node-3:8000", "http://gpu-node-3:8001"] (a trailing /v1 is ignored),
            or `env:VAR` / `file:PATH` entries resolved when training starts (see `resolve_urls`).
        model: served model name; None = the first name `/v1/models` lists.
        sync: "checkpoint" (shared directory + `/collective_rpc reload_weights`), "nccl" (vLLM weight transfer), or
            "none" for a frozen pool that never receives weights (a separate summarizer).
        sync_dir: directory the trainer writes and every server reads (checkpoint sync); required for it.
        shard_bytes: size of one safetensors shard written during a checkpoint sync.
        reset_on_start: reload the servers from the trainer's `model_name_or_path` when training starts, so a pool
            left updated by an earlier run starts from the same weights as the trainer (needs a local folder).
        timeout_s: per request. max_concurrency: requests in flight per training rank. max_retries: attempts per
            request on connection errors and HTTP 5xx.
        startup_timeout_s: how long `start` waits for every server to answer `/v1/models`.
        nccl_master_address: this trainer's address as the servers see it (NCCL sync); nccl_port: the rendezvous
            port of the pool's one broadcast group (None = a free port of this node, picked at the first push: a
            fixed one collides when two trainers share a node).
        update_mode: how a checkpoint reload treats running requests: "none", "wait" or "keep" (module docstring).
    """

    generate_path = "/v1/completions"  # the route `request_body` / `parse_choice` speak

    def __init__(
        self,
        urls: list[str],
        model: str | None = None,
        sync: Literal["checkpoint", "nccl", "none"] = "checkpoint",
        sync_dir: str | None = None,
        shard_bytes: int = 2**30,
        reset_on_start: bool = True,
        timeout_s: float = 3600.0,
        max_concurrency: int = 64,
        max_retries: int = 3,
        startup_timeout_s: float = 900.0,
        nccl_master_address: str | None = None,
        nccl_port: int | None = None,
        update_mode: Literal["none", "wait", "keep"] = "none",
    ) -> None:
        problems = []
        if not urls:
            problems.append("engine.urls must list at least one server URL")
        if sync == "checkpoint" and not sync_dir:
            problems.append("engine.sync_dir is required with sync=checkpoint (a directory the servers can read)")
        if sync == "nccl" and not nccl_master_address:
            problems.append("engine.nccl_master_address is required with sync=nccl (this node's address as the "
                            "servers see it)")
        if problems:
            raise ValueError("VLLMServerEngine: " + "; ".join(problems))
        self.url_entries = list(urls)
        indirect = any(u.startswith(("env:", "file:")) for u in urls)
        self.urls = [] if indirect else resolve_urls(urls)
        self.model = model
        self.sync = sync
        self.sync_dir = Path(sync_dir) if sync_dir else None
        self.shard_bytes = shard_bytes
        self.reset_on_start = reset_on_start
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.startup_timeout_s = startup_timeout_s
        self.nccl_master_address = nccl_master_address
        self.nccl_port = nccl_port
        self.update_mode = update_mode
        self.policy_version = 0
        self.push_dtype: torch.dtype | None = None  # the servers' dtype (asked at start): pushes are cast to it
        self.pushed_bytes = 0  # bytes the last push wrote (checkpoint sync) or sent (NCCL)
        self.client: httpx.Client | None = None
        self.policy: torch.nn.Module | None = None
        self._sender = None  # the NCCL transfer engine of sync=nccl, created at the first push
        self._nccl_bytes = 0
        self._syncs = 0
        self._turn = 0
        self._rank, self._world = 0, 1
        self._no_extension: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self, model: str | None = None) -> None:
        """Wait for every server, resolve the served model name, optionally reset the pool to `model`'s weights."""
        if self.client is not None:
            return
        self.urls = resolve_urls(self.url_entries)
        self._rank, self._world = rank(), world_size()
        self.client = httpx.Client(timeout=self.timeout_s, limits=httpx.Limits(max_connections=self.max_concurrency))
        names = [self._wait_ready(url) for url in self.urls]
        self.model = self.model or names[0][0]
        missing = [u for u, served in zip(self.urls, names) if self.model not in served]
        if missing:
            raise ValueError(f"VLLMServerEngine: servers {missing} do not serve {self.model!r}")
        self.push_dtype = self._serving_dtype() if self.sync != "none" else None  # a frozen pool gets no pushes
        if self.reset_on_start and model and Path(model).is_dir() and self.sync == "checkpoint":
            if rank() == 0:
                self._reload_all(Path(model).resolve())
            barrier()
        log.info("rollout pool ready: %d server(s) serving %s in %s", len(self.urls), self.model,
                 self.push_dtype or "an unknown dtype (pushes keep the trainer's)")

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

    def attach(self, policy: torch.nn.Module, tokenizer) -> None:
        self.policy = policy  # the NCCL sync reads parameters straight from it

    def _wait_ready(self, url: str) -> list[str]:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            self._check_started()
            try:
                reply = self.client.get(f"{url}/v1/models", timeout=10.0)
                if reply.status_code == 200:
                    return [m["id"] for m in reply.json()["data"]]
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rollout server {url} did not answer /v1/models within {self.startup_timeout_s:.0f}s")
            time.sleep(self.poll_ready_s)

    poll_ready_s = 2.0  # seconds between `/v1/models` probes while a server starts

    def _check_started(self) -> None:
        """Raise if a server is known to be gone while `start` waits for it (servers we did not start: unknown)."""

    def describe_server(self, url: str) -> str:
        """How errors name a server (a pool that started it adds its log file)."""
        return f"rollout server {url}"

    def check_alive(self, stalled_s: float | None = None) -> None:
        """Raise naming the first server that refuses connections (`/health`); with `stalled_s`, a TimeoutError
        naming the servers the caller waited on (see `RolloutEngine.check_alive`)."""
        for url in self.urls:
            try:
                httpx.get(f"{url}/health", timeout=30.0)
            except httpx.ConnectError as err:
                raise RuntimeError(f"{self.describe_server(url)} is gone (weight version {self.serving_version}): "
                                   f"{err}") from err
            except httpx.TimeoutException:
                pass  # busy is not dead; a stall is the caller's `stalled_s`
        if stalled_s is not None:
            servers = ", ".join(self.describe_server(url) for url in self.urls)
            raise TimeoutError(f"no rollout came back for {stalled_s:.0f} s from {servers} (weight version "
                               f"{self.serving_version})")

    def close(self) -> None:
        if self._sender is not None:
            self._sender.shutdown()
        self._sender = None
        if self.client is not None:
            self.client.close()
            self.client = None

    # -- generation ----------------------------------------------------------------------------------------------

    def _post(self, url: str, body: dict) -> dict:
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
        """A `/v1/completions` request that pins every sampling knob (no server-side default can change the law)."""
        body = {
            "model": self.model, "prompt": list(prompt), "n": n, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True, "skip_special_tokens": True,
        }
        if seed is not None:
            body["seed"] = seed
        return body

    @staticmethod
    def parse_choice(prompt: list[int], choice: dict, version: int) -> Completion:
        logprobs = choice["logprobs"]
        ids = choice.get("token_ids")
        if ids is None:  # older servers: "token_id:123" strings (return_tokens_as_token_ids)
            ids = [int(t.rsplit(":", 1)[1]) for t in logprobs["tokens"]]
        lps = [float(x) for x in logprobs["token_logprobs"]]
        if len(lps) != len(ids):
            raise ValueError(f"server returned {len(ids)} tokens but {len(lps)} log-probs")
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(list(prompt), list(ids), lps, finish, choice.get("text", ""), version)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, n: int = 1) -> list[list[Completion]]:
        if self.client is None:
            self.start()
        version = self.policy_version
        # prompt i of rank r is the (r + W i)-th of the step over all ranks: the pool's servers take turns
        turn, self._turn = self._turn, self._turn + self._world * len(prompts)

        def one(i: int) -> list[Completion]:
            url = self.urls[(turn + self._rank + self._world * i) % len(self.urls)]
            reply = self._post(f"{url}{self.generate_path}",
                               self.request_body(prompts[i], sampling, n, sampling.prompt_seed(i)))
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            return [self.parse_choice(prompts[i], c, version) for c in choices]

        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(one, range(len(prompts))))

    # -- weight sync ---------------------------------------------------------------------------------------------

    def push_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> dict[str, float]:
        times = super().push_weights(named_tensors, version)
        return {**times, "push_bytes": float(self.pushed_bytes)}

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        if self.client is None:
            self.start()
        if self.sync == "none":
            raise RuntimeError(
                "VLLMServerEngine(sync=none) is a frozen pool; set engine sync: checkpoint or nccl for the policy")
        if self.sync == "nccl":
            self._send_nccl()  # reads the attached policy; the iterator is left unread on every rank alike
        else:
            self._sync_checkpoint(iter(named_tensors))
        barrier()  # no rank samples from the pool before every server has the new weights

    def _sync_checkpoint(self, named_tensors: Iterator[tuple[str, Tensor]]) -> None:
        self._syncs += 1
        target = self._write_checkpoint(named_tensors, self._syncs)
        if target is None:
            return
        self._reload_all(target)
        self._remove_versions_before(self._syncs)  # every server has read the new one

    def _write_checkpoint(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> Path | None:
        """Write the weights in the servers' dtype to `sync_dir/v<version>` on rank 0 (the other ranks only walk
        them: a sharded trainer gathers each parameter collectively); returns the folder (None on other ranks) and
        sets `pushed_bytes`. The checkpoint push of this engine and of `LocalVLLMPool`."""
        target = (self.sync_dir / f"v{version}").resolve() if rank() == 0 else None
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)  # a leftover of an earlier run must not mix in
        self.pushed_bytes = write_safetensors(named_tensors, target, self.shard_bytes, self.push_dtype)
        return target

    def _remove_versions_before(self, version: int) -> None:
        """Remove the pushed versions older than `version` (once every server has loaded a newer one)."""
        for old in self.sync_dir.glob("v*"):
            if old.is_dir() and old.name[1:].isdigit() and int(old.name[1:]) < version:
                shutil.rmtree(old, ignore_errors=True)

    def _reload_all(self, path: Path, version: int | None = None) -> None:
        """Reload every server from `path` (pausing it first unless `update_mode` is "none") and label its weights
        `version`."""
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(path), "is_checkpoint_format": True}}

        def one(url: str) -> None:
            try:
                if self.update_mode != "none":
                    self._post(f"{url}/pause?mode={self.update_mode}", {})
                try:
                    self._post(f"{url}/collective_rpc", rpc)
                    self._refresh_tied_lm_head(url)
                    self._post(f"{url}/reset_prefix_cache", {})  # refused (harmlessly) while "keep" holds requests
                    if version is not None and self.update_mode != "none":
                        self._post(f"{url}/update_weight_version", {"new_version": str(version)})
                finally:
                    if self.update_mode != "none":
                        self._post(f"{url}/resume", {})
            except Exception as err:
                raise RuntimeError(f"{self.describe_server(url)} failed to load weight version "
                                   f"{'v' + str(version) if version is not None else path.name} from {path}: "
                                   f"{err}") from err

        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            list(pool.map(one, self.urls))

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

    def _send_nccl(self) -> None:
        """vLLM's trainer-side NCCL weight transfer over one group for the whole pool (`rollout.pool_sync`): each
        parameter gathered once and broadcast once to every server (GPU only; untested on CPU)."""
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        if self.policy is None:
            raise RuntimeError(
                "VLLMServerEngine(sync=nccl) needs the policy: WeightSyncCallback attaches it at fit start")
        if self._sender is None:
            workers = [int(self.client.get(f"{url}/get_world_size").json()["world_size"]) for url in self.urls]
            pool = PoolWeightSyncClient(
                [HTTPVLLMWeightSyncClient(url, timeout=self.timeout_s) for url in self.urls], workers)
            self.nccl_port = self.nccl_port or free_port("")
            info = NCCLTrainerInitInfo(master_address=self.nccl_master_address, master_port=self.nccl_port,
                                       world_size=1 + sum(workers), rank=rank())
            source = full_parameter_source(self.policy, self.push_dtype)
            self._sender = NCCLTrainerWeightTransferEngine.trainer_init(info, client=pool, source=source)
            self._nccl_bytes = sum(math.prod(m.shape) * m.dtype.itemsize for m in source.metadata())
        self._sender.send_weights()
        self.pushed_bytes = self._nccl_bytes
