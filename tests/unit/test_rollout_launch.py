"""Where each rank's colocated vLLM engine is created (`rollout.launch`, `parallel.process_ranks`): pure functions of
the launcher's environment, checked for torchrun, srun and Lightning's own launcher."""

from __future__ import annotations

import os

import pytest

from qed_lightning.parallel import ProcessRanks, process_ranks
from qed_lightning.rollout.engines.launch import plan_launch, tp_groups


@pytest.mark.parametrize(
    ("env", "dist", "expected"),
    [
        # torchrun exports RANK, WORLD_SIZE, LOCAL_RANK
        ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (None, None), ProcessRanks(5, 8, 1)),
        # srun: Lightning reads SLURM_* and exports neither RANK nor LOCAL_RANK
        ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, (None, None), ProcessRanks(9, 16, 1)),
        # Lightning's own launcher: LOCAL_RANK only; the global rank comes from the process group it initialised
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, (1, 2), ProcessRanks(1, 2, 1)),
        # a lone process
        ({}, (None, None), ProcessRanks(0, 1, 0)),
    ],
)
def test_process_ranks_under_each_launcher(env, dist, expected):
    rank, world = dist
    assert process_ranks(env, dist_rank=-1 if rank is None else rank, dist_world=world) == expected


def test_tp_groups_are_consecutive_blocks_and_must_divide_the_world():
    assert tp_groups(8, 4) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the number of training processes \\(8\\)"):
        tp_groups(8, 3)


def test_each_gpu_rank_gets_its_own_engine_on_its_own_device():
    """8 ranks on 2 nodes of 4 GPUs under srun: rank r's engine is told RANK=r and LOCAL_RANK = the CUDA device
    Lightning gave it (r mod 4), never device 0 for all (the uni-process executor's choice)."""
    plans = [plan_launch(ProcessRanks(r, 8, r % 4), distributed=True, cuda_device=r % 4, tensor_parallel_size=1,
                         seed=10)
             for r in range(8)]
    assert {p.backend for p in plans} == {"external_launcher"}
    assert [p.environment()["LOCAL_RANK"] for p in plans] == ["0", "1", "2", "3"] * 2
    assert [p.environment()["RANK"] for p in plans] == [str(r) for r in range(8)]
    assert [p.tp_group for p in plans] == [(r,) for r in range(8)] and [p.seed for p in plans] == list(range(10, 18))


def test_tensor_parallel_ranks_share_an_engine_and_its_seed():
    plans = [plan_launch(ProcessRanks(r, 4, r), True, r, tensor_parallel_size=2, seed=0) for r in range(4)]
    assert [p.tp_group for p in plans] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [p.seed for p in plans] == [0, 0, 1, 1]  # one seed per engine: its ranks must sample alike


def test_a_lone_cpu_process_keeps_the_uni_process_executor_and_a_lone_gpu_process_does_not():
    cpu = plan_launch(ProcessRanks(), distributed=False, cuda_device=None, tensor_parallel_size=1, seed=0)
    assert cpu.backend is None and cpu.environment() == {}
    gpu = plan_launch(ProcessRanks(), distributed=False, cuda_device=3, tensor_parallel_size=1, seed=0)
    assert gpu.backend == "external_launcher" and gpu.environment()["LOCAL_RANK"] == "3"  # the trainer's device


def test_export_launch_restores_the_environment_after_the_engine_is_created(monkeypatch):
    """vLLM reads RANK/LOCAL_RANK/WORLD_SIZE and a rendezvous only while its engine starts; left behind, a child of
    this process believes it is one rank of a group (a rehearsal hung on it). Values set before are put back."""
    from qed_lightning.rollout.engines.launch import export_launch

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "7")
    launch = plan_launch(ProcessRanks(0, 1, 0), distributed=False, cuda_device=0, tensor_parallel_size=1, seed=0)
    with export_launch(launch):
        seen = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
        assert seen == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        assert os.environ["MASTER_PORT"].isdigit()
    assert [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k in os.environ] == []
    assert os.environ["WORLD_SIZE"] == "7"
