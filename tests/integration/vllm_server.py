"""Start a real `vllm serve` (CPU build) on localhost for a test module, and stop it afterwards."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


@contextlib.contextmanager
def vllm_serve(model: Path, log_path: Path, *flags: str, env: dict[str, str] | None = None,
               startup_s: float = 300.0) -> Iterator[str]:
    """Run `python -m vllm.entrypoints.openai.api_server --model MODEL ... FLAGS` until it answers `/v1/models`,
    yield its base URL (`http://127.0.0.1:PORT`), and terminate it on exit. Startup failures quote the log."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", *flags]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with code {proc.returncode} during startup:\n{_log_tail(log_path)}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not ready after {startup_s:.0f}s:\n{_log_tail(log_path)}")
            time.sleep(1.0)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


#: how scripts/slurm/vllm_pool.sbatch starts each pool member (processed log-probs, no generation_config defaults, our
#: worker extension for reloads), plus what CPU servers need: seeded requests are prefilled whole (VLLMServerEngine)
POOL_FLAGS = ("--logprobs-mode", "processed_logprobs", "--generation-config", "vllm",
              "--worker-extension-cls", "qed_lightning.rollout.engines.vllm_worker.QEDWorkerExtension",
              "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096")


def pool_server(model: Path, log_path: Path, startup_s: float = 300.0):
    """`vllm_serve` as a pool member that accepts weight reloads (`VLLM_SERVER_DEV_MODE=1`)."""
    return vllm_serve(model, log_path, *POOL_FLAGS, env={"VLLM_SERVER_DEV_MODE": "1"}, startup_s=startup_s)
