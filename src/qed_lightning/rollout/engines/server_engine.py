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
  `refresh_tied_lm_head` RPC, see `server_pool`.
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
In-flight updates (`update_mode`: "none", "wait" or "keep") and the tied-lm_head repack after each reload: see
`server_pool`, the client this engine talks to its servers through (the engine is what the trainer sees: its
configuration, its sync modes, its versions; `server_pool.ServerPool` speaks HTTP to the servers, and
`LocalVLLMPool` composes the same client over servers it starts, with the same checkpoint push).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from qed_lightning.parallel.distributed import barrier, rank
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.rollout.engines.server_pool import (
    WORKER_EXTENSION,
    CompletionsAPI,
    ServerPool,
    free_port,
    remove_versions_before,
    resolve_urls,
)
from qed_lightning.rollout.pool_sync import PoolWeightSyncClient, full_parameter_source

__all__ = ["WORKER_EXTENSION", "VLLMServerEngine", "free_port", "resolve_urls"]


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
        update_mode: how a checkpoint reload treats running requests: "none", "wait" or "keep" (`server_pool`).
    """

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
        self.servers = ServerPool(urls, model, timeout_s, max_concurrency, max_retries, api=CompletionsAPI)
        self.sync = sync
        self.sync_dir = Path(sync_dir) if sync_dir else None
        self.shard_bytes = shard_bytes
        self.reset_on_start = reset_on_start
        self.startup_timeout_s = startup_timeout_s
        self.nccl_master_address = nccl_master_address
        self.nccl_port = nccl_port
        self.update_mode = update_mode
        self.policy_version = 0
        self.pushed_bytes = 0  # bytes the last push wrote (checkpoint sync) or sent (NCCL)
        self.policy: torch.nn.Module | None = None
        self._sender = None  # the NCCL transfer engine of sync=nccl, created at the first push
        self._nccl_bytes = 0
        self._syncs = 0

    @property
    def urls(self) -> list[str]:
        """The servers' roots (empty until `start` for `env:` / `file:` entries)."""
        return self.servers.urls

    @property
    def model(self) -> str | None:
        """The served model name (the configured one, or the pool's first once started)."""
        return self.servers.model

    @property
    def push_dtype(self) -> torch.dtype | None:
        """The servers' dtype (asked at start; None for a frozen pool): pushes are cast to it."""
        return self.servers.push_dtype

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self, model: str | None = None) -> None:
        """Wait for every server, resolve the served model name, optionally reset the pool to `model`'s weights."""
        if self.servers.connected:
            return
        self.servers.connect(self.startup_timeout_s, ask_dtype=self.sync != "none")  # a frozen pool gets no pushes
        if self.reset_on_start and model and Path(model).is_dir() and self.sync == "checkpoint":
            if rank() == 0:
                self.servers.reload_all(Path(model).resolve(), update_mode=self.update_mode)
            barrier()

    def attach(self, policy: torch.nn.Module, tokenizer) -> None:
        self.policy = policy  # the NCCL sync reads parameters straight from it

    def check_alive(self, stalled_s: float | None = None) -> None:
        """Raise naming the first server that refuses connections (`/health`); with `stalled_s`, a TimeoutError
        naming the servers the caller waited on (see `RolloutEngine.check_alive`)."""
        self.servers.check_alive(stalled_s, self.serving_version)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.shutdown()
        self._sender = None
        self.servers.close()

    # -- generation ----------------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, n: int = 1) -> list[list[Completion]]:
        if not self.servers.connected:
            self.start()
        return self.servers.generate(prompts, sampling, n, self.policy_version)

    # -- weight sync ---------------------------------------------------------------------------------------------

    def push_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> dict[str, float]:
        times = super().push_weights(named_tensors, version)
        return {**times, "push_bytes": float(self.pushed_bytes)}

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        if not self.servers.connected:
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
        """The pool client's checkpoint push: rank 0 writes `sync_dir/v<N>`, every server reloads it, and the older
        versions are removed."""
        self._syncs += 1
        target, self.pushed_bytes = self.servers.write_checkpoint(named_tensors, self.sync_dir, self._syncs,
                                                                  self.shard_bytes)
        if target is None:
            return
        self.servers.reload_all(target, update_mode=self.update_mode)
        remove_versions_before(self.sync_dir, self._syncs)  # every server has read the new one

    def _send_nccl(self) -> None:
        """vLLM's trainer-side NCCL weight transfer over one group for the whole pool (`rollout.pool_sync`): each
        parameter gathered once and broadcast once to every server (GPU only; untested on CPU)."""
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        if self.policy is None:
            raise RuntimeError(
                "VLLMServerEngine(sync=nccl) needs the policy: WeightSyncCallback attaches it at fit start")
        if self._sender is None:
            urls = self.servers.urls
            workers = [int(self.servers.client.get(f"{url}/get_world_size").json()["world_size"]) for url in urls]
            pool = PoolWeightSyncClient(
                [HTTPVLLMWeightSyncClient(url, timeout=self.servers.timeout_s) for url in urls], workers)
            self.nccl_port = self.nccl_port or free_port("")
            info = NCCLTrainerInitInfo(master_address=self.nccl_master_address, master_port=self.nccl_port,
                                       world_size=1 + sum(workers), rank=rank())
            source = full_parameter_source(self.policy, self.push_dtype)
            self._sender = NCCLTrainerWeightTransferEngine.trainer_init(info, client=pool, source=source)
            self._nccl_bytes = sum(math.prod(m.shape) * m.dtype.itemsize for m in source.metadata())
        self._sender.send_weights()
        self.pushed_bytes = self._nccl_bytes
