"""Scale-out glue on top of Lightning's strategies: FSDP2 over every process, and sharding a HF causal LM with it.

FSDP2 is Lightning's `ModelParallelStrategy` with `torch.distributed.fsdp.fully_shard` applied in the module's
`configure_model`. Lightning's defaults for that strategy are made for 2-D parallelism (data parallel across
nodes, tensor parallel inside a node), so on one node with 8 GPUs it would build a mesh of 1 x 8 and give every
process the same batches. `FSDP2Strategy` only changes those defaults: all processes shard one data-parallel
dimension, each reads its own part of the data. Everything else (launch, mesh, distributed checkpoints) is Lightning's.

`process_ranks` tells a process its rank whichever launcher started it (torchrun, srun, Lightning's own), for the
parts that live outside Lightning's strategy: per-rank vLLM engines and per-rank grade-cache files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` as pure FSDP2: `data_parallel_size` defaults to the world size, tensor parallel to 1.

    Args:
        data_parallel_size: processes that shard the model and split the data ("auto" = num_nodes x devices / tp).
        tensor_parallel_size: kept for completeness; our modules only use the data-parallel mesh dimension.
        save_distributed_checkpoint: True = each rank writes its shard (a checkpoint *directory*, `qed-export` turns
            it into a HF folder); False = the full state gathered on rank 0 into one file.
        process_group_backend: None = nccl on GPUs, gloo on CPU.
        timeout: collective timeout.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, process_group_backend, timeout)

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // int(self._tensor_parallel_size)
        super().setup_environment()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a HF causal LM (`model.model.layers` for Llama/Qwen-style models)."""
    inner = getattr(model, "model", None) or getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"cannot find the decoder layers of {type(model).__name__} (expected `.model.layers`); "
                        "FSDP2 sharding needs them to shard layer by layer")
    return list(layers)


def is_fully_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def apply_fsdp2(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """Shard `model` with FSDP2 over the 1-D `mesh`: each decoder layer, then the root (embeddings, norm, head).

    Idempotent. Activation checkpointing is HF's own (`gradient_checkpointing_enable`, non-reentrant): it wraps each
    layer's `__call__`, so the FSDP hooks run inside the recomputed region and parameters are gathered again for the
    recompute, the same pattern as wrapping each block with `checkpoint_wrapper` before `fully_shard`.
    The flag `_is_fsdp_managed_module` makes transformers' `generate` keep all ranks stepping together
    (`synced_gpus`), which a policy-sharing generator needs.
    """
    from torch.distributed.fsdp import fully_shard

    if is_fully_sharded(model):
        return model
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model._is_fsdp_managed_module = True
    return model


@dataclass(frozen=True)
class ProcessRanks:
    """This process's place in a multi-process job: global rank and world size, rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def process_ranks(env: Mapping[str, str] | None = None, dist_rank: int | None = None,
                  dist_world: int | None = None) -> ProcessRanks:
    """Rank, world size and local rank, whichever launcher started this process.

    The global rank and world size come from the initialised process group when there is one (`dist_rank`,
    `dist_world`; read from torch.distributed when left None), else from `RANK`/`WORLD_SIZE` (torchrun) or
    `SLURM_PROCID`/`SLURM_NTASKS` (srun). The local rank from `LOCAL_RANK` (torchrun, and Lightning's own launcher,
    which exports no `RANK`) or `SLURM_LOCALID` (srun, where Lightning exports neither).

    >>> process_ranks({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, dist_rank=-1)
    ProcessRanks(rank=9, world_size=16, local_rank=1)
    >>> process_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "SLURM_LOCALID": "0"}, dist_rank=-1)
    ProcessRanks(rank=3, world_size=4, local_rank=3)
    >>> process_ranks({"LOCAL_RANK": "1"}, dist_rank=1, dist_world=2)
    ProcessRanks(rank=1, world_size=2, local_rank=1)
    """
    env = os.environ if env is None else env
    if dist_rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        dist_rank, dist_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if dist_rank is not None and dist_rank >= 0:
        rank, world = dist_rank, dist_world or 1
    else:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
        world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return ProcessRanks(rank, world, local)
