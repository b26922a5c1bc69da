"""Running `qed-fit` in a subprocess and reading a run's metrics back, shared by the integration tests."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


#: rank and rendezvous variables an in-process vLLM engine of an earlier test exports into this process; a child
#: that inherits LOCAL_RANK makes Lightning believe its processes are launched externally, and it waits for ranks
#: nobody starts
LAUNCH_VARIABLES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
                    "MASTER_PORT"}


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment less any rank variables, offline, one OpenMP thread per process (the ranks share 2 cores),
    plus `extra`."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return {**base, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", **extra}


def run_process(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> int:
    """Run `cmd` (output to `log`) in its own process group, so a timeout also ends the ranks it launched."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env or subprocess_env(), cwd=REPO,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def read_metrics(root: Path) -> list[dict[str, float]]:
    """The rows of the single `<root>/csv/version_*/metrics.csv`, empty cells dropped."""
    (run_dir,) = sorted((root / "csv").glob("version_*"))
    with open(run_dir / "metrics.csv") as fh:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]


def series(rows: list[dict[str, float]], key: str) -> list[float]:
    """One metric over the run, in logging order."""
    return [r[key] for r in rows if key in r]


def fit_subprocess(root: Path, *args: str, timeout: float = 900) -> list[dict[str, float]]:
    """`qed-fit ARGS --trainer.default_root_dir ROOT` in a subprocess (it may launch more ranks); its metrics rows."""
    import sys

    cmd = [sys.executable, "-m", "qed_lightning.cli", *args, "--trainer.default_root_dir", str(root)]
    log = root.with_suffix(".log")
    assert run_process(cmd, log, timeout) == 0, log.read_text()[-4000:]
    return read_metrics(root)
