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


#: the name the shared server (`SharedServer`) serves the tiny model under; the judge test addresses it by it
SHARED_NAME = "tiny-served"


class SharedServer:
    """One pool-member `vllm serve` of the tiny model (`pool_server`'s flags, served as `SHARED_NAME`) for every test
    that only needs A real server of the tiny model: the disaggregated pool (which reloads weights into it and resets
    it to the model's weights when it starts), the judge's protocol round trip and stage 3's summarizer (neither of
    which depends on the weights). A start costs ~30-40 s on 2 cores; the suite made three. Started by the first test
    that asks for it (`shared_vllm_server`), stopped after the last one that does (conftest's teardown hook); every
    later test gets it reloaded with the tiny model's weights (~1 s), as a fresh server would serve them.

    It serves a link to the model, not the model's own path: the layout tests' `servers_of(tiny_model_dir)` look for
    the server their run started, and this one is not theirs."""

    def __init__(self) -> None:
        self.url: str | None = None
        self._server: contextlib.AbstractContextManager | None = None

    def start(self, model: Path, folder: Path) -> str:
        """The server's base URL, serving `model`'s weights: started now, or reloaded with them (an earlier test may
        have pushed others)."""
        if self.url is None:
            link = folder / "model"
            link.symlink_to(model.resolve(), target_is_directory=True)
            server = vllm_serve(link, folder / "server.log", *POOL_FLAGS, "--served-model-name", SHARED_NAME,
                                env={"VLLM_SERVER_DEV_MODE": "1"})
            self.url = server.__enter__()
            self._server = server
        else:
            from qed_lightning.rollout import VLLMServerEngine

            engine = VLLMServerEngine([self.url], sync_dir=str(folder / "sync"))  # reset_on_start: reloads `model`
            try:
                engine.start(str(model))
            finally:
                engine.close()
        return self.url

    def stop(self) -> None:
        server, self._server, self.url = self._server, None, None
        if server is not None:
            server.__exit__(None, None, None)
