"""The one-node asynchronous layout's generator: vLLM servers this trainer starts on its own node's spare devices.

Paper (PipelineRL): 24 H100s run vLLM servers that generate all the time, 8 train; new weights reach the servers in
flight. `LocalVLLMPool` is that layout inside one node: it starts one OpenAI-compatible vLLM server per entry of
`gpus` (CUDA devices, e.g. `["4", "5", "6", "7"]` next to a 4-GPU trainer) or of `cpus` (CPU cores, e.g. `["1"]` on a
2-core machine whose trainer keeps core 0), on localhost, and talks to them through a `server_pool.ServerPool`
over the started URLs, the client `VLLMServerEngine` uses (why the split: the pool client talks to servers; the
engines are what the trainer sees; this one also owns the server processes, through `local_servers`). The servers
are its children, each under a `server_guard` process: they are stopped by `close`, and die with the trainer if it
is killed (the guard has `PR_SET_PDEATHSIG` and takes the server's whole process group down).

What it does beyond `VLLMServerEngine`:
- generation through vLLM's token-in/token-out route `/inference/v1/generate` (`--enable-scale-out`), whose
  answer labels every sampled token with the weight version that produced it: each `Completion` records the version
  its first token came from (`policy_version`) and, when an in-flight update changed it, its last (`end_version`);
- weight pushes that do not stop generation (`update_mode`, see `server_pool`): "wait" (default; running requests
  finish on their weights, new ones queue; the reload runs in a background thread, so the trainer does not wait for
  the drain) or "keep" (PipelineRL's mixing: running requests are frozen for the reload and continue on the new
  weights; the trainer waits only for the reload, ~0.1 s for a tiny model);
- on CPU: the servers' OpenMP threads bound to their cores (`VLLM_CPU_OMP_THREADS_BIND`) and, with `trainer_cpus`,
  the trainer process pinned to the others with one torch thread per core (restored by `close`), so generation and
  training do not fight over cores; whole prefills (see `vllm_engine`: seeded requests crash a chunked CPU prefill).

Weights and failures (issue 19: nothing waits forever, cleanup runs whatever failed):
- a push writes the weights in the servers' dtype (asked at start: bf16 servers get bf16, not the trainer's fp32
  masters) to `sync_dir/v<version>`, by default `<run folder>/.weights`, and reloads the servers from it: the pool
  client's checkpoint push, the one `VLLMServerEngine` uses too; a version is removed once every server
  has loaded a newer one, everything on `close`, and what a killed run left there is removed (and logged, with its
  size) when the next run in that folder starts. `push_bytes` in the push's stats is logged as
  `rollout/push_bytes`;
- every rank records a push's version at once (`policy_version`, identical on every rank: the next push's decision
  cannot differ between ranks, which under FSDP2 or ZeRO-3 would leave one rank gathering alone); the version the
  servers have loaded (`serving_version`, which the group stream waits for) is read by every rank from the state
  rank 0's reload thread writes in `sync_dir`;
- a failed reload is recorded there too and never dropped: the next push raises it on every rank (rank 0's verdict
  is broadcast), the stream's `check_alive` raises it, and so does `close`, after it has stopped the servers and
  removed the weights. `check_alive` also reports a server whose process exited or that refuses connections; each
  error names the server's URL, its log file and the weight version;
- devices: `gpus` entries index the inherited `CUDA_VISIBLE_DEVICES` (`local_servers`); one node only (the servers
  listen on 127.0.0.1 of global rank 0's node: a trainer over several nodes is refused at start, use
  `VLLMServerEngine` with scripts/slurm/vllm_pool.sbatch).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from qed_lightning.parallel.distributed import broadcast_from_rank0, gather_objects, rank
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.rollout.engines.local_servers import LocalServers, log_tail
from qed_lightning.rollout.engines.server_guard import parse_cpus
from qed_lightning.rollout.engines.server_pool import GenerateAPI, ServerPool, remove_versions_before

log = logging.getLogger(__name__)

LOADED, FAILED = "loaded_version", "push_failed.txt"  # state files in `sync_dir` (see the module docstring)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def remove_leftovers(folder: Path) -> int:
    """Remove what a run that did not close (killed) left in its weights folder; log what and its size. Returns
    the bytes removed."""
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    if not entries:
        return 0
    size = folder_bytes(folder)
    log.warning("removing %d leftover(s) of an earlier run in %s (%.2f GB): %s", len(entries), folder, size / 1e9,
                ", ".join(e.name for e in entries))
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return size


class LocalVLLMPool(RolloutEngine):
    """vLLM servers started by the trainer on this node (see the module docstring).

    Args:
        cpus: one CPU server per entry, bound to those cores ("1", "2-3"); used when `gpus` is empty.
        gpus: one GPU server per entry, on those local CUDA devices ("4", or "4,5" for tensor parallelism over two;
            indices into an inherited `CUDA_VISIBLE_DEVICES`).
        trainer_cpus: pin the trainer process to these cores, one torch thread each (CPU layouts); None = leave it.
        max_model_len: longest prompt + completion. dtype: the servers' dtype ("auto" = float32 on CPU).
        kv_cache_gib: KV-cache GiB of a CPU server (whole GiB: `VLLM_CPU_KVCACHE_SPACE`).
        gpu_memory_utilization: share of a GPU a server takes.
        update_mode: "wait" or "keep" (module docstring).
        sync_dir: where pushed checkpoints go (None = `<run folder>/.weights`, or a temporary folder outside a
            trainer). log_dir: server logs (None = `<run folder>/vllm_logs`, else `sync_dir/logs`).
        server_args: further `vllm serve` flags. startup_timeout_s: how long `start` waits for the servers.
        timeout_s / max_concurrency / max_retries: per request, as `VLLMServerEngine`.
    """

    def __init__(
        self,
        cpus: list[str] | None = None,
        gpus: list[str] | None = None,
        trainer_cpus: str | None = None,
        max_model_len: int = 4096,
        dtype: str = "auto",
        kv_cache_gib: int = 1,
        gpu_memory_utilization: float = 0.85,
        update_mode: Literal["wait", "keep"] = "wait",
        sync_dir: str | None = None,
        log_dir: str | None = None,
        server_args: list[str] | None = None,
        startup_timeout_s: float = 900.0,
        timeout_s: float = 3600.0,
        max_concurrency: int = 256,
        max_retries: int = 3,
    ) -> None:
        cpus = ["1"] if cpus is None and not gpus else list(cpus or [])
        if bool(cpus) == bool(gpus):
            raise ValueError(
                "LocalVLLMPool: give either engine.cpus (CPU servers) or engine.gpus (GPU servers), not both")
        self.update_mode = update_mode
        self.startup_timeout_s, self.timeout_s = startup_timeout_s, timeout_s
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.servers: ServerPool | None = None  # the client over the started servers (`start`)
        self.policy_version = 0
        self.pushed_bytes = 0  # bytes the last push wrote
        self.processes = LocalServers(cpus, list(gpus or []), max_model_len, dtype, kv_cache_gib,
                                      gpu_memory_utilization, list(server_args or []))
        self.trainer_cpus = trainer_cpus
        self.max_model_len = max_model_len
        self.sync_dir = Path(sync_dir) if sync_dir else None
        self.log_dir = Path(log_dir) if log_dir else None
        self.run_dir: Path | None = None
        self._own_sync_dir = sync_dir is None
        self.log_paths: dict[str, Path] = {}
        self._pusher: ThreadPoolExecutor | None = None
        self._pushes: list[Future] = []
        self._requested = 0  # the newest version pushed
        self._failure: str | None = None  # rank 0: a failed reload, as raised everywhere
        self._failure_raised = False
        self.reload_s: list[float] = []  # seconds each reload took on the servers (pause, load, resume)
        self._trainer_affinity: tuple[set[int], int] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def use_run_dir(self, path: Path) -> None:
        self.run_dir = Path(path)

    def start(self, model: str | None = None) -> None:
        """Start the servers from `model` (the policy's starting weights), wait for them, pin the trainer."""
        if self.servers is not None:
            return
        if model is None:
            raise ValueError("LocalVLLMPool needs the policy's model folder to start its servers")
        hosts = sorted(set(gather_objects(socket.gethostname())))
        if len(hosts) > 1:
            raise ValueError(f"LocalVLLMPool runs on one node (its servers listen on 127.0.0.1 of global rank 0), but "
                             f"this trainer spans {len(hosts)} ({', '.join(hosts)}): use VLLMServerEngine with "
                             "scripts/slurm/vllm_pool.sbatch")
        urls, logs = [], []
        if rank() == 0:
            urls, logs = self.processes.launch(model, self._prepare_dirs())
            atexit.register(self.close)  # an exception ends a fit without teardown hooks: cleanup runs anyway
        self.sync_dir, urls, logs = broadcast_from_rank0((self.sync_dir, urls, logs))
        self.log_paths = dict(zip(urls, logs))  # one pool per node: rank 0 starts it, every rank uses it
        self.servers = ServerPool(urls, None, self.timeout_s, self.max_concurrency, self.max_retries, api=GenerateAPI,
                                  log_paths=self.log_paths)
        try:
            self.servers.connect(self.startup_timeout_s, poll_s=1.0, check_started=self.processes.check_started)
        except TimeoutError as err:
            tails = "\n".join(log_tail(path) for path in logs)
            self.close()
            raise TimeoutError(f"{err}\n{tails}") from err
        if rank() == 0:
            self.servers.label_version(self.policy_version)  # the starting weights (vLLM calls them "default")
            self._write_state(LOADED, str(self.policy_version))
        self._pin_trainer()

    def _prepare_dirs(self) -> Path:
        """Rank 0: the weights folder (a killed run's leftovers removed) and the logs folder."""
        if self.sync_dir is None and self.run_dir is not None:
            self.sync_dir = self.run_dir / ".weights"
            remove_leftovers(self.sync_dir)
        elif self.sync_dir is None:
            self.sync_dir = Path(tempfile.mkdtemp(prefix="qed_local_pool_"))
        self.sync_dir = self.sync_dir.resolve()
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        for name in (LOADED, FAILED):
            (self.sync_dir / name).unlink(missing_ok=True)
        logs = self.log_dir or (self.run_dir / "vllm_logs" if self.run_dir is not None else self.sync_dir / "logs")
        logs.mkdir(parents=True, exist_ok=True)
        return logs.resolve()

    @property
    def urls(self) -> list[str]:
        """The started servers' roots (empty before `start`)."""
        return self.servers.urls if self.servers is not None else []

    @property
    def push_dtype(self) -> torch.dtype | None:
        """The servers' dtype (asked at start): pushes are cast to it."""
        return self.servers.push_dtype if self.servers is not None else None

    def describe_server(self, url: str) -> str:
        """How errors name a server: its URL and log file."""
        return self.servers.describe(url) if self.servers is not None else f"vLLM server {url}"

    def check_alive(self, stalled_s: float | None = None) -> None:
        """A failed reload, a server process that exited (rank 0 started them) or a server that refuses
        connections raises one error naming the server, its log and the weight version; see `RolloutEngine`."""
        failure = self._read_state(FAILED)
        if failure:
            raise RuntimeError(failure)
        exited = self.processes.exited(self.urls)
        if exited is not None:
            raise RuntimeError(f"{self.describe_server(exited[0])} exited with code {exited[1]} while serving "
                               f"weight version {self.serving_version}")
        if self.servers is None:
            return super().check_alive(stalled_s)
        self.servers.check_alive(stalled_s, self.serving_version)

    def _pin_trainer(self) -> None:
        if self.trainer_cpus is None or self.processes.gpus or self._trainer_affinity is not None:
            return
        cores = parse_cpus(self.trainer_cpus)
        self._trainer_affinity = (os.sched_getaffinity(0), torch.get_num_threads())
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
        log.info("trainer pinned to cores %s (%d torch threads)", sorted(cores), len(cores))

    def close(self) -> None:
        """Stop the servers and remove the pushed weights whatever failed; then raise a failed reload nobody has
        raised yet."""
        atexit.unregister(self.close)
        try:
            for push in self._pushes:  # `_reload` records its failures; this only lets a running one finish
                push.result()
        finally:
            self._pushes = []
            if self._pusher is not None:
                self._pusher.shutdown(wait=True)
                self._pusher = None
            if self.servers is not None:
                self.servers.close()
                self.servers = None
            self.processes.stop()
            if self._trainer_affinity is not None:
                cores, threads = self._trainer_affinity
                os.sched_setaffinity(0, cores)
                torch.set_num_threads(threads)
                self._trainer_affinity = None
            self._remove_weights()
        if self._failure is not None and not self._failure_raised:
            self._failure_raised = True
            raise RuntimeError(self._failure)

    def _remove_weights(self) -> None:
        """Rank 0: every pushed version and the state files; the folder itself if this pool made it and it is empty."""
        if rank() != 0 or self.sync_dir is None or not self.sync_dir.exists():
            return
        for entry in self.sync_dir.iterdir():
            if entry.is_dir() and entry.name[:1] == "v" and entry.name[1:].isdigit():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name in (LOADED, FAILED, LOADED + ".tmp"):
                entry.unlink(missing_ok=True)
        if self._own_sync_dir and not any(self.sync_dir.iterdir()):
            self.sync_dir.rmdir()

    # -- generation ----------------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, n: int = 1) -> list[list[Completion]]:
        """Through vLLM's `/inference/v1/generate` (`server_pool.GenerateAPI`): each completion records the weight
        versions its tokens came from."""
        if self.servers is None:
            self.start()
        return self.servers.generate(prompts, sampling, n, self.policy_version)

    # -- weight pushes -------------------------------------------------------------------------------------------

    @property
    def serving_version(self) -> int:  # type: ignore[override]
        """The version every server has loaded (rank 0's reload thread writes it; every rank reads it)."""
        text = self._read_state(LOADED)
        return int(text) if text else 0

    def _state_path(self, name: str) -> Path | None:
        return self.sync_dir / name if self.sync_dir is not None and self.servers is not None else None

    def _read_state(self, name: str) -> str | None:
        path = self._state_path(name)
        try:
            return path.read_text() if path is not None else None
        except FileNotFoundError:
            return None

    def _write_state(self, name: str, text: str) -> None:
        path = self._state_path(name)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: a reader sees the old text or the new one

    def push_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> dict[str, float]:
        """Write the weights to `sync_dir/v<version>` in the servers' dtype (every rank walks them), then reload
        the servers: with "wait" in a background thread (the trainer goes on; reloads run in order, and one that a
        newer push overtook while it waited is skipped), with "keep" at once. Every rank records `version` now;
        a failed reload is raised on every rank by the next push (with "keep": by this one)."""
        started = time.perf_counter()
        if self.servers is None:
            raise RuntimeError("LocalVLLMPool.push_weights before start")
        self._raise_failure()
        target, self.pushed_bytes = self.servers.write_checkpoint(named_tensors, self.sync_dir, version)
        written = time.perf_counter()
        self._requested = version
        self.set_policy_version(version)  # on every rank alike: the next push's decision is the same everywhere
        if target is not None and self.update_mode == "wait":
            self._pusher = self._pusher or ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-push")
            self._pushes = [p for p in self._pushes if not p.done()]
            self._pushes.append(self._pusher.submit(self._reload, target, version))
        elif target is not None:
            self._reload(target, version)
        if self.update_mode != "wait":
            self._raise_failure()
        return {"wake_s": 0.0, "load_s": written - started, "push_bytes": float(self.pushed_bytes)}

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self.push_weights(named_tensors, self.policy_version + 1)

    def _raise_failure(self) -> None:
        """Rank 0's failed reload, raised on every rank (a collective: every rank calls it at the same point)."""
        failure = broadcast_from_rank0(self._failure if rank() == 0 else None)
        if failure is not None:
            self._failure_raised = True
            raise RuntimeError(failure)

    def _reload(self, target: Path, version: int) -> None:
        """Rank 0: load `target` on every server, record it (or the failure, never raised from this thread), and
        remove the older versions, which no server reads any more."""
        if self._failure is not None or version < self._requested:  # failed before, or a newer one is queued
            shutil.rmtree(target, ignore_errors=True)
            return
        started = time.perf_counter()
        try:
            self.servers.reload_all(target, version, self.update_mode)
        except Exception as err:  # noqa: BLE001 - recorded, raised by the next push, the stream and close
            self._failure = str(err)
            self._write_state(FAILED, self._failure)
            log.error("%s", self._failure)
            return
        self.reload_s.append(time.perf_counter() - started)
        self._write_state(LOADED, str(version))
        remove_versions_before(self.sync_dir, version)  # only older ones: a newer one may be queued already

    def wait_for_push(self) -> None:
        """Block until the pushes so far reached the servers (tests; the end of training); raise a failed one."""
        for push in self._pushes:
            push.result()
        self._pushes = []
        if self._failure is not None:
            self._failure_raised = True
            raise RuntimeError(self._failure)
