"""Where a colocated vLLM engine runs: one engine per training process, on that process's own device.

What vLLM 0.32 does (read in its sources, `v1/executor/uniproc_executor.py`, `config/parallel.py`,
`distributed/parallel_state.py`):
- `LLM(...)` without `distributed_executor_backend` in a single-GPU configuration uses the uni-process executor,
  which takes its local rank from the device string ("cuda", so 0) and makes `cuda:0` the current device of the
  whole process. In a trainer started by Lightning, srun or torchrun, every rank's engine would land on GPU 0:
  rank 1 fails on free memory, and the trainer's current device is overwritten.
- `distributed_executor_backend="external_launcher"` (`ExecutorWithExternalLauncher`) is vLLM's mode for engines
  started one per process by an outside launcher (TRL's colocate mode uses it). It reads `RANK` and `LOCAL_RANK`
  from the environment (`init_method="env://"`), uses `LOCAL_RANK` as the CUDA device index, and joins the
  process group that already exists (the trainer's) instead of creating one; it forces
  `VLLM_ENABLE_V1_MULTIPROCESSING=0`. Ranks are laid out as ExternalDP x DP x PP x TP, so with tensor
  parallelism t the engine is sharded over groups of t consecutive ranks, and with t = 1 every rank is an engine
  of its own. All ranks of one group must submit the same requests in the same order (vLLM's scheduling is then
  identical on each) and use the same engine seed.
- Its memory profile takes the minimum over ranks, so the ranks create their engines together.

Lightning exports `LOCAL_RANK` but no `RANK` from its own launcher, and neither under srun (`SLURM_PROCID`,
`SLURM_LOCALID`), so `engine_environment` derives both: the global rank from the process group, the local rank
from the trainer's current CUDA device (the device Lightning gave this rank; it is the index vLLM must use), or on
CPU from the launcher's variables. The CPU build runs this same path in the 2-process tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qed_lightning.parallel.distributed import is_distributed
from qed_lightning.parallel.strategies import ProcessRanks, process_ranks

EXTERNAL_LAUNCHER = "external_launcher"


@dataclass(frozen=True)
class EngineLaunch:
    """How this process's engine is created: vLLM's executor backend (None = uni-process), the ranks it is told,
    its tensor-parallel group (global ranks that share one engine) and the engine seed."""

    backend: str | None
    ranks: ProcessRanks
    device_index: int
    tp_group: tuple[int, ...]
    seed: int

    def environment(self) -> dict[str, str]:
        """The variables `ExecutorWithExternalLauncher` reads (empty for the uni-process executor)."""
        if self.backend != EXTERNAL_LAUNCHER:
            return {}
        return {"RANK": str(self.ranks.rank), "LOCAL_RANK": str(self.device_index),
                "WORLD_SIZE": str(self.ranks.world_size)}


def tp_groups(world_size: int, tensor_parallel_size: int) -> list[tuple[int, ...]]:
    """vLLM's tensor-parallel groups over `world_size` ranks: consecutive blocks of `tensor_parallel_size`.

    >>> tp_groups(4, 2)
    [(0, 1), (2, 3)]
    >>> tp_groups(2, 1)
    [(0,), (1,)]
    """
    if tensor_parallel_size < 1 or world_size % tensor_parallel_size:
        raise ValueError(f"engine tensor_parallel_size={tensor_parallel_size} must divide the number of training "
                         f"processes ({world_size}): each group of that many ranks shares one engine")
    return [tuple(range(g, g + tensor_parallel_size)) for g in range(0, world_size, tensor_parallel_size)]


def plan_launch(ranks: ProcessRanks, distributed: bool, cuda_device: int | None, tensor_parallel_size: int,
                seed: int) -> EngineLaunch:
    """The engine launch of a process with `ranks`, in a process group or not (`distributed`), on CUDA device
    `cuda_device` (None = CPU).

    External launcher whenever the process belongs to a group or sits on a GPU: a lone GPU process could be on
    any device index, which the uni-process executor would ignore. A lone CPU process keeps the uni-process
    executor (no process group is created for it). The seed is shared by a tensor-parallel group.

    >>> plan = plan_launch(ProcessRanks(rank=3, world_size=4, local_rank=1), True, 1, 2, seed=0)
    >>> plan.backend, plan.environment(), plan.tp_group, plan.seed
    ('external_launcher', {'RANK': '3', 'LOCAL_RANK': '1', 'WORLD_SIZE': '4'}, (2, 3), 1)
    >>> plan_launch(ProcessRanks(), False, None, 1, seed=5).backend is None
    True
    """
    groups = tp_groups(ranks.world_size, tensor_parallel_size)
    group = ranks.rank // tensor_parallel_size
    backend = EXTERNAL_LAUNCHER if distributed or cuda_device is not None or tensor_parallel_size > 1 else None
    device = cuda_device if cuda_device is not None else ranks.local_rank
    return EngineLaunch(backend, ranks, device, groups[group], seed + group)


def current_launch(tensor_parallel_size: int, seed: int) -> EngineLaunch:
    """`plan_launch` for this process, as its launcher and Lightning set it up."""
    distributed = is_distributed()
    cuda = torch.cuda.current_device() if torch.cuda.is_available() else None
    return plan_launch(process_ranks(), distributed, cuda, tensor_parallel_size, seed)


@contextlib.contextmanager
def export_launch(launch: EngineLaunch) -> Iterator[None]:
    """Set the launch's variables (and a rendezvous for a process that has no group yet: a lone GPU process, or
    tensor parallelism under a launcher that exported none) while vLLM creates its engine, and restore the
    environment afterwards: vLLM reads them only while it starts, and a RANK or LOCAL_RANK left behind would make a
    child of this process (a later run, a rehearsal) believe it was launched as one rank of a group."""
    saved = {key: os.environ.get(key) for key in (*launch.environment(), "MASTER_ADDR", "MASTER_PORT")}
    try:
        os.environ.update(launch.environment())
        if launch.backend == EXTERNAL_LAUNCHER and not torch.distributed.is_initialized():
            if launch.ranks.world_size > 1 and "MASTER_ADDR" not in os.environ:
                raise RuntimeError("a vLLM engine shared by several processes needs their rendezvous: start them with "
                                   "torchrun, srun + Lightning, or export MASTER_ADDR and MASTER_PORT")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
