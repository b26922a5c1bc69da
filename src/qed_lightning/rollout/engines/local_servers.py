"""The vLLM server processes a `LocalVLLMPool` starts on its own node: their commands, environments, start and stop.

Why a module of its own: `local_pool.LocalVLLMPool` is the engine the trainer sees (versions, pushes, failures); it
talks to its servers through `server_pool.ServerPool`, like `VLLMServerEngine`; and it owns the server processes,
through `LocalServers` here. One OpenAI-compatible server per entry of `gpus` or else `cpus`, on 127.0.0.1, each
under a `server_guard` process (parent-death signal and CPU pinning set in the child, no `preexec_fn` in the
multi-threaded trainer): stopped by `stop`, and gone with the trainer if it is killed. `gpus` entries index the
inherited `CUDA_VISIBLE_DEVICES` (server 0 on local device 0 of a trainer started with `CUDA_VISIBLE_DEVICES=4,5,6,7`
gets GPU 4). CPU servers get their cores' OpenMP binding (`VLLM_CPU_OMP_THREADS_BIND`) and whole prefills (see
`vllm_engine`: seeded requests crash a chunked CPU prefill).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from qed_lightning.rollout.engines.server_guard import guard_command, parse_cpus
from qed_lightning.rollout.engines.server_pool import WORKER_EXTENSION, free_port

log = logging.getLogger(__name__)

#: rank and rendezvous variables of the trainer, not passed on to the servers it starts
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
                    "MASTER_PORT")


def visible_devices(devices: str, inherited: str | None) -> str:
    """The CUDA devices of a server on this process's local devices `devices` ("0" or "0,1"): entries of the
    inherited `CUDA_VISIBLE_DEVICES` when it is set, else the indices themselves.

    >>> visible_devices("0,1", "4,5,6,7"), visible_devices("2", None)
    ('4,5', '2')
    """
    local = [d.strip() for d in devices.split(",") if d.strip()]
    parent = [d.strip() for d in (inherited or "").split(",") if d.strip()]
    if not parent:
        return ",".join(local)
    for d in local:
        if not d.isdigit() or int(d) >= len(parent):
            raise ValueError(f"LocalVLLMPool: engine.gpus entry {devices!r} asks for local device {d}, but "
                             f"CUDA_VISIBLE_DEVICES={inherited} gives this trainer {len(parent)} (index 0-"
                             f"{len(parent) - 1} into that list)")
    return ",".join(parent[int(d)] for d in local)


def log_tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
    return f"--- {path} ---\n" + "\n".join(text)


class LocalServers:
    """The server processes of one `LocalVLLMPool` (its arguments of the same names, see there)."""

    def __init__(self, cpus: list[str], gpus: list[str], max_model_len: int, dtype: str, kv_cache_gib: int,
                 gpu_memory_utilization: float, server_args: list[str]) -> None:
        self.cpus, self.gpus = cpus, gpus
        self.max_model_len, self.dtype, self.kv_cache_gib = max_model_len, dtype, kv_cache_gib
        self.gpu_memory_utilization, self.server_args = gpu_memory_utilization, server_args
        self.procs: list[subprocess.Popen] = []

    def command(self, model: str, port: int, devices: str) -> list[str]:
        cpu = not self.gpus
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--max-model-len", str(self.max_model_len), "--logprobs-mode", "processed_logprobs",
               "--generation-config", "vllm", "--enable-scale-out", "--worker-extension-cls", WORKER_EXTENSION,
               "--dtype", "float32" if cpu and self.dtype == "auto" else self.dtype]
        if cpu:  # whole prefills (seeded requests, see vllm_engine); eager (no graphs to capture on CPU)
            cmd += ["--enforce-eager", "--no-enable-chunked-prefill", "--max-num-batched-tokens",
                    str(max(self.max_model_len, 4096))]
        else:
            cmd += ["--tensor-parallel-size", str(len(devices.split(","))),
                    "--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return cmd + self.server_args

    def env(self, devices: str, environ: dict[str, str]) -> dict[str, str]:
        """A server's environment: this one less the trainer's rank variables, plus its devices or cores."""
        env = {k: v for k, v in environ.items() if k not in LAUNCH_VARIABLES}
        env["VLLM_SERVER_DEV_MODE"] = "1"
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = visible_devices(devices, environ.get("CUDA_VISIBLE_DEVICES"))
        else:
            env.update(VLLM_CPU_OMP_THREADS_BIND=devices, VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib),
                       OMP_NUM_THREADS=str(len(parse_cpus(devices))))
        return env

    def launch(self, model: str, logs_dir: Path) -> tuple[list[str], list[Path]]:
        """Start one server per entry from `model`, each logging to `logs_dir/vllm_server_<i>.log`; returns their
        URLs and log files (they are still starting)."""
        urls, logs = [], []
        for i, devices in enumerate(self.gpus or self.cpus):
            logs.append(logs_dir / f"vllm_server_{i}.log")
            urls.append(self._launch(model, i, devices, logs[-1]))
        return urls, logs

    def _launch(self, model: str, i: int, devices: str, log_path: Path) -> str:
        port = free_port()
        env = self.env(devices, dict(os.environ))
        cmd = guard_command(self.command(model, port, devices), cpus=None if self.gpus else devices)
        with open(log_path, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        log.info("started vLLM server %d (pid %d) on %s %s, log %s", i, proc.pid,
                 f"GPUs {env['CUDA_VISIBLE_DEVICES']}" if self.gpus else "cores", devices, log_path)
        return f"http://127.0.0.1:{port}"

    def check_started(self) -> None:
        """A server that exits during start-up fails `start` at once (its log is quoted by `start`)."""
        dead = [p for p in self.procs if p.poll() is not None]
        if dead:
            raise TimeoutError(f"vLLM server (pid {dead[0].pid}) exited with code {dead[0].returncode} during start-up")

    def exited(self, urls: list[str]) -> tuple[str, int] | None:
        """The URL and exit code of the first server whose process exited (None: all running, or started
        elsewhere: only global rank 0 holds the processes)."""
        for url, proc in zip(urls, self.procs):
            if proc.poll() is not None:
                return url, proc.returncode
        return None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # the guard stops the server's process group (SIGTERM, then SIGKILL)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs = []
