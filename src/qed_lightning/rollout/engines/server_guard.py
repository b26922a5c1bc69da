"""Run a command (a vLLM server) in its own process group and take the whole group down when told to, or when the
process that started the guard dies, even by SIGKILL.

    python -m qed_lightning.rollout.engines.server_guard [--grace-s 10] [--parent PID] [--cpus 1-3] -- CMD ...

`LocalVLLMPool` starts each server through this guard (`guard_command`). The guard itself, not a `preexec_fn` of
the multi-threaded trainer, sets up what the server inherits: `--parent PID` sets `PR_SET_PDEATHSIG` (when the
trainer dies the guard gets SIGTERM and sends it to the server's group, then SIGKILL after `--grace-s`; a trainer
already gone before that is caught by comparing the guard's parent with PID), `--cpus` pins the guard, and with it
the server, to those cores. The grace period is
not optional: found by the SIGKILL test, a vLLM API server whose client died mid-request catches SIGTERM, loses its
engine core, and then waits forever in its graceful shutdown. The guard exits with the server's exit code.

The guard is a child subreaper (`PR_SET_CHILD_SUBREAPER`): a server process whose parent exits first (vLLM's worker,
when the API server goes down before it) becomes the guard's child rather than PID 1's, and the guard reaps it. Before
this, such a worker stayed a zombie wherever PID 1 does not reap (a container's init), the group never looked empty,
and every stop waited the whole grace period plus the SIGKILL wait (~20 s a server, found by timing the suite).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


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


def guard_command(cmd: list[str], cpus: str | None = None, grace_s: float = 10.0) -> list[str]:
    """`cmd` run under this guard, dying with this process, pinned to `cpus` ("1-3") if given."""
    return [sys.executable, "-m", "qed_lightning.rollout.engines.server_guard", "--grace-s", str(grace_s),
            "--parent", str(os.getpid()), *(["--cpus", cpus] if cpus else []), "--", *cmd]


def _reap() -> None:
    """Collect every exited child of the guard: the server, and (the guard being a subreaper) its orphans."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the server's group, SIGKILL to whatever is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()
            _reap()  # exited members (zombies) still count as the group's until someone reaps them
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group (the engine core, vLLM's resource tracker)?
            except ProcessLookupError:
                return
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grace-s", type=float, default=10.0)
    parser.add_argument("--parent", type=int, default=None, help="die (SIGTERM) when this process dies")
    parser.add_argument("--cpus", default=None, help="cores of the guard and the server, e.g. 1-3")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if args.cpus:
        os.sched_setaffinity(0, parse_cpus(args.cpus))
    started: list[subprocess.Popen] = []

    def on_signal(signum, frame) -> None:
        for proc in started:
            _stop(proc, args.grace_s)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)  # before the server exists: a signal in between must not orphan it
    signal.signal(signal.SIGINT, on_signal)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # the server's orphans become ours to reap (module docstring)
    if args.parent is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != args.parent:  # the trainer died before the line above: nobody would stop the server
            return 128 + signal.SIGTERM
    proc = subprocess.Popen(cmd, start_new_session=True)
    started.append(proc)
    code = proc.wait()
    _stop(proc, args.grace_s)  # the server's own children, if it left any
    return code


if __name__ == "__main__":
    raise SystemExit(main())
