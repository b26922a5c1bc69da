"""The one-node asynchronous layout's generator: vLLM servers this trainer starts on its own node's spare devices.

Paper (PipelineRL): 24 H100s run vLLM servers that generate all the time, 8 train; new weights reach the servers in
flight. `LocalVLLMPool` is that layout inside one node: it starts one OpenAI-compatible vLLM server per entry of
`gpus` (CUDA devices, e.g. `["4", "5", "6", "7"]` next to a 4-GPU trainer) or of `cpus` (CPU cores, e.g. `["1"]` on a
2-core machine whose trainer keeps core 0), on localhost, and drives them as a `VLLMServerEngine` pool. The servers
are its children, each under a `server_guard` process: they are stopped by `close`, and die with the trainer if it
is killed (the guard has `PR_SET_PDEATHSIG` and takes the server's whole process group down).

What it adds to `VLLMServerEngine`:
- generation through vLLM's token-in/token-out route `/inference/v1/generate` (`--enable-scale-out`), whose
  answer labels every sampled token with the weight version that produced it: each `Completion` records the version
  its first token came from (`policy_version`) and, when an in-flight update changed it, its last (`end_version`);
- weight pushes that do not stop generation (`update_mode`, see `server_engine`): "wait" (default; running requests
  finish on their weights, new ones queue; the reload runs in a background thread, so the trainer does not wait for
  the drain) or "keep" (PipelineRL's mixing: running requests are frozen for the reload and continue on the new
  weights; the trainer waits only for the reload, ~0.1 s for a tiny model);
- on CPU: the servers' OpenMP threads bound to their cores (`VLLM_CPU_OMP_THREADS_BIND`) and, with `trainer_cpus`,
  the trainer process pinned to the others with one torch thread per core (restored by `close`), so generation and
  training do not fight over cores; whole prefills (see `vllm_engine`: seeded requests crash a chunked CPU prefill).

The checkpoints a push writes go to `sync_dir` (a temporary folder by default: the servers are on this node).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from qed_lightning.parallel.distributed import broadcast_from_rank0, rank
from qed_lightning.rollout.base import Completion, SamplingConfig
from qed_lightning.rollout.engines.server_engine import WORKER_EXTENSION, VLLMServerEngine, write_safetensors

log = logging.getLogger(__name__)


def parse_cpus(spec: str) -> set[int]:
    """CPU ids from a list like "0", "1-3" or "0,2-3".

    >>> sorted(parse_cpus("0,2-3"))
    [0, 2, 3]
    """
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent(cpus: set[int] | None):
    """`preexec_fn` of a server's guard: SIGTERM when the trainer dies (even by SIGKILL), and its cores, if given
    (the server inherits them)."""
    def setup() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


class LocalVLLMPool(VLLMServerEngine):
    """vLLM servers started by the trainer on this node (see the module docstring).

    Args:
        cpus: one CPU server per entry, bound to those cores ("1", "2-3"); used when `gpus` is empty.
        gpus: one GPU server per entry, on those CUDA devices ("4", or "4,5" for tensor parallelism over two).
        trainer_cpus: pin the trainer process to these cores, one torch thread each (CPU layouts); None = leave it.
        max_model_len: longest prompt + completion. dtype: the servers' dtype ("auto" = float32 on CPU).
        kv_cache_gib: KV-cache GiB of a CPU server (whole GiB: `VLLM_CPU_KVCACHE_SPACE`). gpu_memory_utilization: share of a GPU a server takes.
        update_mode: "wait" or "keep" (module docstring).
        sync_dir: where pushed checkpoints go (None = a temporary folder). log_dir: server logs (None = sync_dir).
        server_args: further `vllm serve` flags. startup_timeout_s: how long `start` waits for the servers.
        timeout_s / max_concurrency / max_retries: per request, as `VLLMServerEngine`.
    """

    generate_path = "/inference/v1/generate"

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
            raise ValueError("LocalVLLMPool: give either engine.cpus (CPU servers) or engine.gpus (GPU servers), not both")
        super().__init__(["local"], sync="checkpoint", sync_dir=sync_dir or "<temporary>", reset_on_start=False,
                         timeout_s=timeout_s, max_concurrency=max_concurrency, max_retries=max_retries,
                         startup_timeout_s=startup_timeout_s, update_mode=update_mode)
        self.cpus, self.gpus, self.trainer_cpus = cpus, list(gpus or []), trainer_cpus
        self.max_model_len = max_model_len
        self.dtype, self.kv_cache_gib, self.gpu_memory_utilization = dtype, kv_cache_gib, gpu_memory_utilization
        self.log_dir = Path(log_dir) if log_dir else None
        self.server_args = list(server_args or [])
        self._own_sync_dir = sync_dir is None
        self._procs: list[subprocess.Popen] = []
        self._pusher: ThreadPoolExecutor | None = None
        self._push: Future | None = None
        self._requested = 0  # the newest version pushed
        self.reload_s: list[float] = []  # seconds each reload took on the servers (pause, load, resume)
        self._trainer_affinity: tuple[set[int], int] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self, model: str | None = None) -> None:
        """Start the servers from `model` (the policy's starting weights), wait for them, pin the trainer."""
        if self.client is not None:
            return
        if model is None:
            raise ValueError("LocalVLLMPool needs the policy's model folder to start its servers")
        if self._own_sync_dir:
            self.sync_dir = Path(tempfile.mkdtemp(prefix="qed_local_pool_"))
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        logs = self.log_dir or self.sync_dir
        logs.mkdir(parents=True, exist_ok=True)
        urls = [self._launch(model, i, devices, logs / f"vllm_server_{i}.log")
                for i, devices in enumerate(self.gpus or self.cpus)] if rank() == 0 else []
        self.url_entries = urls = broadcast_from_rank0(urls)  # one pool per node: rank 0 starts it, every rank uses it
        try:
            super().start(model)
        except TimeoutError as err:
            tails = "\n".join(self._log_tail(logs / f"vllm_server_{i}.log") for i in range(len(urls)))
            self.close()
            raise TimeoutError(f"{err}\n{tails}") from err
        for url in self.urls:  # label the starting weights as version 0 (vLLM calls them "default")
            self._post(f"{url}/update_weight_version", {"new_version": str(self.policy_version)})
        self._pin_trainer()

    def _server_command(self, model: str, port: int, devices: str) -> list[str]:
        cpu = not self.gpus
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--max-model-len", str(self.max_model_len), "--logprobs-mode", "processed_logprobs",
               "--generation-config", "vllm", "--enable-scale-out", "--worker-extension-cls", WORKER_EXTENSION,
               "--dtype", "float32" if cpu and self.dtype == "auto" else self.dtype]
        if cpu:  # whole prefills (seeded requests, see vllm_engine); eager (no graphs to capture on CPU)
            cmd += ["--enforce-eager", "--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(self.max_model_len, 4096))]
        else:
            cmd += ["--tensor-parallel-size", str(len(devices.split(","))),
                    "--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return cmd + self.server_args

    def _launch(self, model: str, i: int, devices: str, log_path: Path) -> str:
        port = _free_port()
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = devices
            cores = None
        else:
            cores = parse_cpus(devices)
            env.update(VLLM_CPU_OMP_THREADS_BIND=devices, VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib),
                       OMP_NUM_THREADS=str(len(cores)))
        guard = [sys.executable, "-m", "qed_lightning.rollout.engines.server_guard", "--"]
        with open(log_path, "w") as fh:
            proc = subprocess.Popen(guard + self._server_command(model, port, devices), stdout=fh,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=_die_with_parent(cores))
        self._procs.append(proc)
        log.info("started vLLM server %d (pid %d) on %s %s, log %s", i, proc.pid, "GPUs" if self.gpus else "cores",
                 devices, log_path)
        return f"http://127.0.0.1:{port}"

    poll_ready_s = 1.0

    def _check_alive(self) -> None:
        """A server that exits during start-up fails `start` at once (its log is quoted by `start`)."""
        dead = [p for p in self._procs if p.poll() is not None]
        if dead:
            raise TimeoutError(f"vLLM server (pid {dead[0].pid}) exited with code {dead[0].returncode} during start-up")

    @staticmethod
    def _log_tail(path: Path, lines: int = 30) -> str:
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
        return f"--- {path} ---\n" + "\n".join(text)

    def _pin_trainer(self) -> None:
        if self.trainer_cpus is None or self.gpus or self._trainer_affinity is not None:
            return
        cores = parse_cpus(self.trainer_cpus)
        self._trainer_affinity = (os.sched_getaffinity(0), torch.get_num_threads())
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
        log.info("trainer pinned to cores %s (%d torch threads)", sorted(cores), len(cores))

    def close(self) -> None:
        if self._push is not None:
            self._push.result()
            self._push = None
        if self._pusher is not None:
            self._pusher.shutdown(wait=True)
            self._pusher = None
        super().close()
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()  # the guard stops the server's process group (SIGTERM, then SIGKILL)
        for proc in self._procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._procs = []
        if self._trainer_affinity is not None:
            cores, threads = self._trainer_affinity
            os.sched_setaffinity(0, cores)
            torch.set_num_threads(threads)
            self._trainer_affinity = None
        if self._own_sync_dir and self.sync_dir is not None and self.sync_dir.exists():
            shutil.rmtree(self.sync_dir, ignore_errors=True)

    # -- generation ----------------------------------------------------------------------------------------------

    def request_body(self, prompt: list[int], sampling: SamplingConfig, n: int, seed: int | None) -> dict:
        """A `/inference/v1/generate` request pinning every sampling knob, as `/v1/completions`' in the base class."""
        params = {
            "n": n, "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1, "min_p": 0.0, "repetition_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": 0, "skip_special_tokens": True,
        }
        if seed is not None:
            params["seed"] = seed
        return {"model": self.model, "token_ids": list(prompt), "sampling_params": params, "output_mode": "text"}

    @staticmethod
    def parse_choice(prompt: list[int], choice: dict, version: int) -> Completion:
        """A choice of `/inference/v1/generate`: token ids, their log-probs, text, and the weight versions its tokens
        were sampled with (`version`, the client's, when the server reports none)."""
        ids = [int(t) for t in choice["token_ids"]]
        lps = [float(entry["logprob"]) for entry in (choice.get("logprobs") or {}).get("content") or []]
        if len(lps) != len(ids):
            raise ValueError(f"server returned {len(ids)} tokens but {len(lps)} log-probs")
        spans = [int(s["version"]) for s in choice.get("weight_versions") or [] if str(s["version"]).isdigit()]
        first, last = (spans[0], spans[-1]) if spans else (version, version)
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(list(prompt), ids, lps, finish, choice.get("text", ""), first,
                          end_version=last if last != first else None)

    # -- weight pushes -------------------------------------------------------------------------------------------

    def push_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> dict[str, float]:
        """Write the weights to `sync_dir/v<version>` (every rank walks them), then reload the servers: with "wait"
        in a background thread (the trainer goes on; reloads run in order, and one that a newer push overtook while
        it waited is skipped; `policy_version` moves when a reload is done), with "keep" at once."""
        started = time.perf_counter()
        if self.client is None:
            raise RuntimeError("LocalVLLMPool.push_weights before start")
        target = (self.sync_dir / f"v{version}").resolve() if rank() == 0 else None
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)
        write_safetensors(named_tensors, target, self.shard_bytes)
        written = time.perf_counter()
        self._requested = version
        if target is None:
            self.set_policy_version(version)
        elif self.update_mode == "wait":
            self._pusher = self._pusher or ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-push")
            self._push = self._pusher.submit(self._reload, target, version)
        else:
            self._reload(target, version)
        return {"wake_s": 0.0, "load_s": written - started}

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self.push_weights(named_tensors, self.policy_version + 1)

    def _reload(self, target: Path, version: int) -> None:
        if version < self._requested:  # a newer checkpoint is queued behind this one: load that instead
            shutil.rmtree(target, ignore_errors=True)
            return
        started = time.perf_counter()
        self._reload_all(target, version)
        self.reload_s.append(time.perf_counter() - started)
        self.set_policy_version(version)
        for old in self.sync_dir.glob("v*"):  # only older checkpoints: a newer one may be queued already
            if old.is_dir() and old.name[1:].isdigit() and int(old.name[1:]) < version:
                shutil.rmtree(old, ignore_errors=True)

    def wait_for_push(self) -> None:
        """Block until the last push reached the servers (tests; the end of training)."""
        if self._push is not None:
            self._push.result()
            self._push = None

