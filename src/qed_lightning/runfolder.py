"""One run per folder: what `qed-fit fit` checks in `default_root_dir` before anything heavy starts.

A run's folder (`trainer.default_root_dir`) holds everything of one run: `checkpoints/`, `rollouts/`, `csv/`, the
export `hf/`. Lightning itself happily starts a second run on top of a first (`last-v1.ckpt` beside `last.ckpt`, a
new `csv/version_N`, the first run's rollout records replaced), so before `fit`:

- a folder that already holds a checkpoint is refused unless the command resumes it (`--ckpt_path last` or a path):
  the message gives both ways out (resume, or a new `default_root_dir`). We refuse rather than resume automatically
  because a rerun with a changed config would otherwise silently continue the old run with the new settings;
- `--ckpt_path last` in a folder with checkpoints but no `last*.ckpt` is refused, naming the folder (Lightning would
  start from step 0 with a warning); with no checkpoint at all it starts fresh, so a SLURM script can always pass it;
- a lock file `<root>/.qed-run.lock` (host, pid, start time) is held for the run by global rank 0, so a second
  `qed-fit` on the same folder is refused with the holder named. A lock whose process is gone (same host) or whose
  heartbeat (the file's mtime, touched every `HEARTBEAT_S`) is older than `STALE_S` (another host: a killed node) is
  stale and taken over with a log line; so is a lock of the same SLURM job (`SLURM_JOB_ID`: a requeued job keeps its
  id, and may land on another node right after its first node died).

`validate`, `test` and `predict` take no lock and refuse nothing: they only read a checkpoint (their metrics go to
`<root>/<subcommand>/`, apart from the training curves).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from qed_lightning.data.loading import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".qed-run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


def checkpoints_in(folder: Path) -> list[Path]:
    """The `*.ckpt` files (or sharded checkpoint folders) directly in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("*.ckpt")), key=lambda p: p.stat().st_mtime)


#: what a run writes under its folder, each a folder (a file in its place would fail the run after a step's work)
RUN_FOLDERS = ("checkpoints", "rollouts", "csv", "hf")


def check_fit_folder(root: Path, ckpt_path: str | None, dirpath: Path | None = None) -> None:
    """Refuse a fresh run on top of an old one, and a `--ckpt_path last` that would silently start from step 0."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"trainer.default_root_dir={root} is a file, not a folder: point it at a folder")
    for name in RUN_FOLDERS:
        if (root / name).exists() and not (root / name).is_dir():
            raise ConfigError(f"{root / name} is a file where the run writes its {name}/ folder: move it away")
    ckpts = checkpoints_in(dirpath or root / "checkpoints")
    if ckpt_path is None and ckpts:
        raise ConfigError(
            f"{root} already holds a run ({len(ckpts)} checkpoint(s), newest {ckpts[-1].name}): resume it with "
            f"--ckpt_path last, or start a new run with --trainer.default_root_dir {root}-2 (or remove {root})")
    if ckpt_path == "last" and ckpts and not any(p.name.startswith("last") for p in ckpts):
        raise ConfigError(
            f"--ckpt_path last: {ckpts[0].parent} holds {len(ckpts)} checkpoint(s) but no last.ckpt, so Lightning "
            f"would start again from step 0; pass the one to resume, e.g. --ckpt_path {ckpts[-1]}")


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint holds, reading no tensor (a file through mmap, a sharded folder's metadata; None
    for a DeepSpeed folder, whose client state sits inside its own shards); raises what the reading raises (a
    truncated or empty file: EOFError, RuntimeError, ...)."""
    import torch

    if path.is_dir():  # a sharded checkpoint (FSDP2/DCP): Lightning's metadata file beside the shards
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        if not (path / _METADATA_FILENAME).exists() and (path / "latest").exists():
            return None  # DeepSpeed: read by DeepSpeed itself, which names what is missing
        meta = torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=False)
    else:
        meta = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return int(meta["global_step"])


def check_resume_checkpoint(folder: Path, ckpt_path: str) -> None:
    """The checkpoint `--ckpt_path` names (`last`: the newest `last*.ckpt` in `folder`) must be readable. If not, the
    error names it with its size and the newest readable checkpoint beside it. We do not fall back to that one
    ourselves: an unreadable checkpoint despite atomic saves means a disk or copy problem worth a look, and resuming
    from an older step redoes steps (and rewrites their rollout records); the user decides, with one flag."""
    if ckpt_path == "last":
        lasts = [p for p in checkpoints_in(folder) if p.name.startswith("last")]
        if not lasts:
            return  # a fresh start (checked by check_fit_folder)
        path = lasts[-1]
    else:
        path = Path(ckpt_path)
        if not path.exists():
            raise ConfigError(f"--ckpt_path {ckpt_path}: no such checkpoint")
    try:
        checkpoint_step(path)
    except Exception as err:  # noqa: BLE001 - any failure to read is the same news for the user
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        readable = []
        for other in reversed(checkpoints_in(path.parent)):
            if other != path:
                try:
                    readable.append((other, checkpoint_step(other)))
                    break
                except Exception:  # noqa: BLE001
                    continue
        hint = (f"the newest readable checkpoint is {readable[0][0]} (step {readable[0][1]}): resume from it with "
                f"--ckpt_path {readable[0][0]}" if readable else f"no other readable checkpoint is in {path.parent}")
        detail = str(err).splitlines()[0] if str(err) else "no detail"
        raise ConfigError(f"--ckpt_path {ckpt_path}: {path} ({size:,} bytes) cannot be read "
                          f"({type(err).__name__}: {detail}); {hint}") from err


def is_global_zero_process() -> bool:
    """Whether this process will be global rank 0 (read from the launcher's environment, before any process group).

    A non-zero local or node rank settles it first: Lightning's own launcher re-runs the command for ranks > 0 with
    `LOCAL_RANK` set and nothing else, so a `RANK=0` left in the environment by something earlier (an in-process
    vLLM engine exports it) must not make every child believe it is rank 0. Then the launchers' global ranks."""
    for key in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        if os.environ.get(key) not in (None, "", "0"):
            return False
    for key in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(key) not in (None, ""):
            return os.environ[key] == "0"
    return True


class RunLock:
    """`<root>/.qed-run.lock`, held while a run trains in `root` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_FILE
        self._stop = threading.Event()
        self._held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict | None) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return True
        if holder is None:
            return age > 5.0  # a lock being written this instant reads as empty; an older empty one is debris
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("job") == job and holder.get("pid") != os.getpid():
            return True  # this job's earlier incarnation: requeued after a pre-emption or a node failure
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, KeyError):
                return False
            return False
        return age > STALE_S

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "job": os.environ.get("SLURM_JOB_ID")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                           if holder else "a process that is starting")
                    raise ConfigError(
                        f"{self.path.parent} is in use by another run ({who}): wait for it, or give this run its own "
                        f"--trainer.default_root_dir (if that process is gone, remove {self.path})") from None
                log.warning("taking over the stale run lock %s (held by %s)", self.path, holder)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            self._held = True
            threading.Thread(target=self._beat, name="qed-run-lock", daemon=True).start()
            atexit.register(self.release)
            return
        raise ConfigError(f"could not take the run lock {self.path}")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self._held = False
