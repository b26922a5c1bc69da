r"""Rehearse the paper pipeline on CPU through the shipped configs' own paths: sft -> rl -> validate -> rc -> eval.

    .venv/bin/python scripts/rehearse.py                          # one process, colocated layout, in runs/rehearsal
    .venv/bin/python scripts/rehearse.py --devices 2              # 2 training processes (FSDP2, configs' strategy)
    .venv/bin/python scripts/rehearse.py --stages rl --layout one_node_async   # stage 2 in a layout config
    bash scripts/rehearse.sh ...                                  # the same, after the set-up

Each stage is typed as a user types it, in one working folder, with the UNMODIFIED paper config first and the
rehearsal overlay of `configs/rehearsal/` after it (sizes, devices, precision and the judge's client only):

    qed-fit --config configs/sft.yaml --config configs/rehearsal/sft.yaml
    qed-fit --config configs/rl.yaml --config configs/rehearsal/rl.yaml                 # reads runs/sft/hf
    qed-fit validate --config configs/rl.yaml --config configs/rehearsal/rl.yaml \
        --ckpt_path runs/rl/checkpoints/last.ckpt
    qed-fit --config configs/rc.yaml --config configs/rehearsal/rc.yaml                 # reads runs/rl/hf
    qed-eval --config configs/eval/imo_proofbench.yaml --config configs/rehearsal/eval.yaml --model runs/rc/hf

The working folder gets `data/` and `.cache/tiny` as links, so the overlays' relative paths resolve as they do in
the repository. What a cluster runs beside the trainer runs here on localhost: `vllm serve` of the tiny model for
stage 3's summarizer (QED_SUMMARIZER_URLS) and, with `--layout pipeline_rl`, for the rollout pool (QED_POOL_URLS).
The stages it runs start from nothing (their `runs/<stage>` folders are removed first); each stage's log is
`<work>/logs/<stage>.log`, and a failed stage prints its tail and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("sft", "rl", "validate", "rc", "eval")
LAUNCH_VARIABLES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
                    "MASTER_PORT"}
LAYOUTS = ("colocated", "one_node_async", "pipeline_rl")
#: how scripts/slurm/vllm_pool.sbatch starts a pool member, plus what a CPU server needs
POOL_FLAGS = ["--logprobs-mode", "processed_logprobs", "--generation-config", "vllm",
              "--worker-extension-cls", "qed_lightning.rollout.engines.vllm_worker.QEDWorkerExtension",
              "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def vllm_serve(model: str, log: Path, flags: list[str], env: dict[str, str], cwd: Path, startup_s: float = 300.0):
    """A `vllm serve` of `model` on a free localhost port until the block ends; yields its base URL."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", *flags]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"[rehearse] vllm serve {model} exited during start-up; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"[rehearse] vllm serve {model} not ready after {startup_s:.0f} s; see {log}")
            time.sleep(1.0)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def commands(stage: str, devices: int, layout: str) -> list[str]:
    """What a user types for `stage` (relative to the working folder; configs by absolute path)."""
    c = lambda name: ["--config", str(REPO / "configs" / name)]  # noqa: E731
    scale = ["--trainer.devices", str(devices)] if devices != 1 else []
    if stage == "sft":
        return [str(BIN / "qed-fit"), *c("sft.yaml"), *c("rehearsal/sft.yaml"), *scale]
    if stage in ("rl", "validate"):
        extra = [*c(f"layout/{layout}.yaml"), *c(f"rehearsal/{layout}.yaml")] if layout != "colocated" else []
        head = [str(BIN / "qed-fit")] + (["validate"] if stage == "validate" else [])
        tail = ["--ckpt_path", "runs/rl/checkpoints/last.ckpt"] if stage == "validate" else []
        return [*head, *c("rl.yaml"), *c("rehearsal/rl.yaml"), *extra, *scale, *tail]
    if stage == "rc":
        return [str(BIN / "qed-fit"), *c("rc.yaml"), *c("rehearsal/rc.yaml"), *scale]
    return [str(BIN / "qed-eval"), *c("eval/imo_proofbench.yaml"), *c("rehearsal/eval.yaml"), "--model", "runs/rc/hf"]


#: what each stage must leave behind, through the shipped configs' own paths
OUTPUTS = {"sft": ["runs/sft/hf/config.json", "runs/sft/checkpoints/last.ckpt"],
           "rl": ["runs/rl/hf/config.json", "runs/rl/checkpoints/last.ckpt"],
           "validate": ["runs/rl/validate/version_0/metrics.csv"],
           "rc": ["runs/rc/hf/config.json", "runs/rc/checkpoints/last.ckpt"],
           "eval": ["runs/eval/imo_proofbench/summary.json"]}


def prepare(work: Path, tiny: Path, stages: list[str]) -> None:
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / ".cache").mkdir(exist_ok=True)
    for link, target in ((work / "data", REPO / "data"), (work / ".cache" / "tiny", tiny)):
        if not link.exists():
            link.symlink_to(target.resolve(), target_is_directory=True)
    for stage in stages:
        folder = work / ("runs/eval/imo_proofbench" if stage == "eval" else f"runs/{stage}")
        if stage != "validate" and folder.exists():
            shutil.rmtree(folder)


def run_stage(stage: str, work: Path, devices: int, layout: str, env: dict[str, str], timeout_s: float) -> float:
    cmd = commands(stage, devices, layout)
    log = work / "logs" / f"{stage}.log"
    print(f"[rehearse] {stage}: {' '.join(Path(a).name if a.startswith(str(BIN)) else a for a in cmd)}", flush=True)
    started = time.monotonic()
    # several training processes on a small CPU machine: one OpenMP thread each, or they spin against each other
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if devices > 1 else {}
    # a user's fresh shell: no rank or rendezvous variables left over from whatever started this script
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=work, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s,
                              env={**base, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **threads, **env})
    seconds = time.monotonic() - started
    missing = [p for p in OUTPUTS[stage] if not (work / p).exists()]
    if proc.returncode or missing:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        print(f"{tail}\n[rehearse] {stage} FAILED (exit {proc.returncode}, missing {missing}); log: {log}", flush=True)
        raise SystemExit(1)
    print(f"[rehearse] {stage}: ok in {seconds:.0f} s ({', '.join(OUTPUTS[stage])})", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rehearse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "rehearsal", help="working folder")
    parser.add_argument("--devices", type=int, default=1, help="training processes per stage (1 or 2 on CPU)")
    parser.add_argument("--layout", choices=LAYOUTS, default="colocated", help="stage 2's layout config")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    parser.add_argument("--tiny", type=Path, default=REPO / ".cache" / "tiny", help="the tiny offline model")
    parser.add_argument("--timeout_s", type=float, default=900.0, help="per stage")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if unknown := sorted(set(stages) - set(STAGES)):
        parser.error(f"unknown stages {unknown}; choose from {','.join(STAGES)}")
    work = args.work.resolve()
    prepare(work, args.tiny, stages)
    env: dict[str, str] = {}
    with contextlib.ExitStack() as servers:
        total = 0.0
        for stage in STAGES:
            if stage not in stages:
                continue
            if stage == "rc" and "QED_SUMMARIZER_URLS" not in env:
                env["QED_SUMMARIZER_URLS"] = servers.enter_context(vllm_serve(
                    ".cache/tiny", work / "logs" / "summarizer.log", ["--no-enable-chunked-prefill",
                                                                     "--max-num-batched-tokens", "4096"], {}, work))
            if stage in ("rl", "validate") and args.layout == "pipeline_rl" and "QED_POOL_URLS" not in env:
                env["QED_POOL_URLS"] = servers.enter_context(vllm_serve(
                    "runs/sft/hf", work / "logs" / "pool.log", POOL_FLAGS, {"VLLM_SERVER_DEV_MODE": "1"}, work))
            total += run_stage(stage, work, args.devices, args.layout, env, args.timeout_s)
    print(f"[rehearse] all {len(stages)} stages ok in {total:.0f} s; runs in {work / 'runs'}", flush=True)


if __name__ == "__main__":
    main()
