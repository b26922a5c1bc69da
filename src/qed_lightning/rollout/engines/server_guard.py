"""Run a command (a vLLM server) in its own process group and take the whole group down when told to, or when the
process that started the guard dies, even by SIGKILL.

    python -m qed_lightning.rollout.engines.server_guard [--grace-s 10] -- CMD ...

`LocalVLLMPool` starts each server through this guard with `PR_SET_PDEATHSIG` set on the guard: when the trainer
dies the guard gets SIGTERM and sends it to the server's group, then SIGKILL after `--grace-s`. The grace period is
not optional: found by the SIGKILL test, a vLLM API server whose client died mid-request catches SIGTERM, loses its
engine core, and then waits forever in its graceful shutdown. The guard exits with the server's exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the server's group, SIGKILL to whatever is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group (the engine core, vLLM's resource tracker)?
            except ProcessLookupError:
                return
            proc.poll()
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grace-s", type=float, default=10.0)
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    started: list[subprocess.Popen] = []

    def on_signal(signum, frame) -> None:
        for proc in started:
            _stop(proc, args.grace_s)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)  # before the server exists: a signal in between must not orphan it
    signal.signal(signal.SIGINT, on_signal)
    proc = subprocess.Popen(cmd, start_new_session=True)
    started.append(proc)
    code = proc.wait()
    _stop(proc, args.grace_s)  # the server's own children, if it left any
    return code


if __name__ == "__main__":
    raise SystemExit(main())
