"""The bounded, phase-aware meeting of the ranks before an RL step's first collective (`StepRendezvous`), on two real
gloo processes, and the collective timeout the strategies default to."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import os, sys, time
import torch.distributed as dist
from qed_lightning.parallel.distributed import StepRendezvous, StepWaitTimeout
from qed_lightning.metrics import StepPhases

dist.init_process_group("gloo")
rank = dist.get_rank()
rendezvous = StepRendezvous(float(sys.argv[1]), "model.step_wait_timeout_s", poll_s=0.05)
phases = StepPhases([rendezvous])
with phases.phase("generate"):
    time.sleep(0.3 * rank)  # a little skew, well within the bound
print(f"rank {rank} step 0 waited {rendezvous.wait(0):.2f}", flush=True)
with phases.phase("generate"):
    pass
with phases.phase("grade"):
    if rank == 1:
        time.sleep(float(sys.argv[2]))  # rank 1's judge is slow
started = time.monotonic()
try:
    rendezvous.wait(1)
    print(f"rank {rank} step 1 met", flush=True)
except StepWaitTimeout as err:
    print(f"rank {rank} after {time.monotonic() - started:.1f} s: {err}", flush=True)
os._exit(0)  # no teardown: rank 0 must not wait for a rank that is still asleep in the test's other case
'''


def _run(tmp_path: Path, bound: float, delay: float) -> str:
    script = tmp_path / "rendezvous.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(bound), str(delay)], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_rank_left_behind_in_grading_is_named_with_its_phase_within_the_bound(tmp_path):
    out = _run(tmp_path, bound=1.5, delay=4.0)
    assert "rank 0 step 0 waited" in out and "rank 1 step 0 waited" in out  # a small skew: both met
    (line0,) = [line for line in out.splitlines() if line.startswith("rank 0 after")]
    seconds = float(line0.split()[3])
    assert 1.5 <= seconds < 3.5, line0  # the bound, not the slow rank's 4 s
    assert re.search(r"rank 0 waited \d s at step 1's first collective for the other ranks, longer than "
                     r"model\.step_wait_timeout_s=1\.5 s: rank 1 in phase 'grade' \(for \d s\)\. ", line0), line0
    # the slow rank, once at the rendezvous, stops at once with the same error instead of waiting for its bound
    (line1,) = [line for line in out.splitlines() if line.startswith("rank 1 after")]
    assert float(line1.split()[3]) < 1.0 and line1.split(": ", 1)[1] == line0.split(": ", 1)[1]


def test_strategies_default_to_a_collective_timeout_that_fits_an_rl_step():
    from qed_lightning.parallel import DeepSpeedStrategy, FSDP2Strategy
    from qed_lightning.parallel.strategies import RL_COLLECTIVE_TIMEOUT

    assert RL_COLLECTIVE_TIMEOUT == timedelta(hours=4)
    assert FSDP2Strategy()._timeout == DeepSpeedStrategy(stage=3)._timeout == RL_COLLECTIVE_TIMEOUT
    assert FSDP2Strategy(timeout=timedelta(minutes=5))._timeout == timedelta(minutes=5)


@pytest.mark.parametrize("stage", ["configs/rl.yaml", "configs/rc.yaml"])
def test_the_paper_configs_set_the_collective_timeout_and_a_strategy_preset_keeps_it(stage, print_config):
    for preset in ("", "configs/strategy/deepspeed_zero3.yaml", "configs/strategy/ddp.yaml"):
        config = print_config(stage, *([preset] if preset else []))
        assert config["trainer"]["strategy"]["init_args"]["timeout"] == "4:00:00", preset
        assert config["model"]["init_args"]["step_wait_timeout_s"] == 10800.0
