"""server_guard takes a server's whole process group down when the trainer that started it is SIGKILLed, even a
server that ignores SIGTERM (as a vLLM API server stuck in its graceful shutdown does). The trainer starts the guard
as LocalVLLMPool does (`guard_command`, no `preexec_fn`): the parent-death signal and the cores are set in the
guard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

# the "trainer": starts the guard the way LocalVLLMPool does, prints the guard's pid, then waits to be killed
TRAINER = textwrap.dedent("""
    import subprocess, sys, time
    from qed_lightning.rollout.engines.server_guard import guard_command
    stubborn = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); time.sleep(600)")
    guard = subprocess.Popen(guard_command([sys.executable, "-c", stubborn], cpus="0", grace_s=1),
                             start_new_session=True)
    print(guard.pid, flush=True)
    time.sleep(600)
""")


def _family(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_a_sigkilled_trainer_takes_its_stubborn_server_and_the_servers_child_along():
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER], stdout=subprocess.PIPE, text=True, env=os.environ)
    guard_pid = int(trainer.stdout.readline())
    deadline = time.monotonic() + 30
    while len(_family(guard_pid)) < 3:  # guard, server, server's child
        assert time.monotonic() < deadline, "the stand-in server did not start"
        time.sleep(0.1)
    family = _family(guard_pid)
    assert {p.cpu_affinity()[0] for p in family} == {0} and {len(p.cpu_affinity()) for p in family} == {1}
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(timeout=10)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive


def test_a_guard_whose_trainer_is_already_gone_does_not_start_its_server(tmp_path):
    """The race `--parent` closes: the trainer died before the guard set its parent-death signal."""
    marker = tmp_path / "started"
    cmd = [sys.executable, "-m", "qed_lightning.rollout.engines.server_guard", "--parent", "1", "--",
           sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    assert subprocess.run(cmd, timeout=60).returncode == 128 + signal.SIGTERM
    assert not marker.exists()


def test_a_stop_is_not_held_up_by_a_servers_exited_orphan():
    """A server that goes down on SIGTERM before its worker (as vLLM's API server does) orphans the worker; the guard
    reaps it (it is a subreaper), so the stop ends when the processes do, not after the grace period and the SIGKILL
    wait (where PID 1 does not reap, the orphan stayed a zombie and held the group: ~20 s a server)."""
    server = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              "'import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), sys.exit(0))); "
              "time.sleep(600)']); time.sleep(600)")
    guard = subprocess.Popen([sys.executable, "-m", "qed_lightning.rollout.engines.server_guard", "--grace-s", "8",
                              "--", sys.executable, "-c", server], start_new_session=True)
    deadline = time.monotonic() + 30
    while len(_family(guard.pid)) < 3:  # guard, server, worker
        assert time.monotonic() < deadline, "the stand-in server did not start"
        time.sleep(0.1)
    family = _family(guard.pid)
    start = time.monotonic()
    guard.send_signal(signal.SIGTERM)
    assert guard.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - start < 5, "the guard waited out its grace period for an exited orphan"
    _, alive = psutil.wait_procs(family[1:], timeout=5)
    assert not alive, alive
