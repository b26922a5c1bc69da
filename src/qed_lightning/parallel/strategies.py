"""Scale-out glue on top of Lightning's strategies: FSDP2 over every process, DeepSpeed that also runs on CPU, and the
strategies our manual-optimisation modules refuse.

FSDP2 is Lightning's `ModelParallelStrategy` with `torch.distributed.fsdp.fully_shard` applied in the module's
`configure_model`. Lightning's defaults for that strategy are made for 2-D parallelism (data parallel across
nodes, tensor parallel inside a node), so on one node with 8 GPUs it would build a mesh of 1 x 8 and give every
process the same batches. `FSDP2Strategy` only changes those defaults: all processes shard one data-parallel
dimension, each reads its own part of the data. Everything else (launch, mesh, distributed checkpoints) is Lightning's.

`process_ranks` tells a process its rank whichever launcher started it (torchrun, srun, Lightning's own), for the
parts that live outside Lightning's strategy: per-rank vLLM engines and per-rank grade-cache files.

`DeepSpeedStrategy` is Lightning's, plus: it runs on a CPU accelerator (DeepSpeed's own CPU accelerator,
`DS_ACCELERATOR=cpu`, over gloo: how the ZeRO presets are tested here; Lightning refuses anything but CUDA), and with
an offloaded optimizer it turns torch's Adam/AdamW into DeepSpeed's CPU Adam with the same hyperparameters
(`deepspeed.initialize` refuses a torch optimizer on offloaded parameters, `zero_force_ds_cpu_optimizer`).

Collective timeout (`timeout`, Lightning's own argument of both strategies): how long a rank may wait inside one
collective before the watchdog aborts the job. torch's default, 30 minutes, is shorter than a paper-scale RL step can
keep one rank waiting, so both default to `RL_COLLECTIVE_TIMEOUT` (4 h; the arithmetic is in docs/scaling.md,
"Timeouts"). The skew between ranks before a step's first collective (one still generating or grading) is bounded
apart, with an error naming the slow rank and its phase (`model.step_wait_timeout_s`, `distributed.StepRendezvous`).

Lightning's FSDP1 `FSDPStrategy` is refused (`refuse_unsupported_strategy`): with manual optimisation the backward
inside `training_step` runs inside the FSDP root's forward and fails (Lightning issues #19626, #19685), FSDP1 wraps
the LightningModule, so weight sync and the HF export would read flat shards, and its precision plugin refuses
`gradient_clip_val`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from lightning.fabric.utilities.seed import reset_seed
from typing_extensions import override

log = logging.getLogger(__name__)

#: the collective timeout both strategies default to: above a paper-scale RL step's worst case (~2 h: 128 sequences
#: of up to 49k tokens per rank, then a judge at up to 900 s x 3 attempts per grade) and above the ranks' bounded
#: wait before a step's first collective (`model.step_wait_timeout_s`, 3 h), which is not a collective
RL_COLLECTIVE_TIMEOUT = timedelta(hours=4)


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` as pure FSDP2: `data_parallel_size` defaults to the world size, tensor parallel to 1.

    Args:
        data_parallel_size: processes that shard the model and split the data ("auto" = num_nodes x devices / tp).
        tensor_parallel_size: kept for completeness; our modules only use the data-parallel mesh dimension.
        save_distributed_checkpoint: True = each rank writes its shard (a checkpoint *directory*, `qed-export` turns
            it into a HF folder); False = the full state gathered on rank 0 into one file.
        process_group_backend: None = nccl on GPUs, gloo on CPU.
        timeout: how long a rank may wait inside one collective before the job is aborted (default 4 h,
            `RL_COLLECTIVE_TIMEOUT`; torch's own default, 30 min, is shorter than a paper-scale RL step's skew).
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = RL_COLLECTIVE_TIMEOUT,
    ) -> None:
        super().__init__(data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, process_group_backend,
                         timeout)

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


def apply_fsdp2(model: torch.nn.Module, mesh, mp_policy=None) -> torch.nn.Module:
    """Shard `model` with FSDP2 over the 1-D `mesh`: each decoder layer, then the root (embeddings, norm, head).
    `mp_policy` (`qed_lightning.model.precision.fsdp2_policy`): a `MixedPrecisionPolicy`, e.g. bf16 compute on the fp32
    sharded parameters; None = compute in the parameters' dtype.

    Idempotent. Activation checkpointing is HF's own (`gradient_checkpointing_enable`, non-reentrant): it wraps each
    layer's `__call__`, so the FSDP hooks run inside the recomputed region and parameters are gathered again for the
    recompute, the same pattern as wrapping each block with `checkpoint_wrapper` before `fully_shard`.
    The flag `_is_fsdp_managed_module` makes transformers' `generate` keep all ranks stepping together
    (`synced_gpus`), which a policy-sharing generator needs.
    """
    from torch.distributed.fsdp import fully_shard

    if is_fully_sharded(model):
        return model
    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
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


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's `DeepSpeedStrategy` (same arguments), also on a CPU accelerator, and with DeepSpeed's CPU Adam where
    the optimizer is offloaded; see the module docstring. On CPU, `DS_ACCELERATOR=cpu` is set for DeepSpeed and the
    processes talk over gloo; DeepSpeed builds a small shared-memory op (and CPU Adam, when offloading) on first use.
    Its collective `timeout` defaults to `RL_COLLECTIVE_TIMEOUT` (4 h) instead of torch's 30 minutes.

    Args:
        timeout: how long a rank may wait inside one collective before the job is aborted (default 4 h,
            `RL_COLLECTIVE_TIMEOUT`; torch's own default, 30 min, is shorter than a paper-scale RL step's skew).
    """

    def __init__(self, *args, timeout: timedelta | None = RL_COLLECTIVE_TIMEOUT, **kwargs) -> None:
        super().__init__(*args, timeout=timeout, **kwargs)

    @override
    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            DDPStrategy.setup_environment(self)  # Lightning's own check refuses any accelerator but CUDA
            return
        super().setup_environment()

    @override
    def setup_distributed(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            return super().setup_distributed()
        # Lightning's checks that device indices match local ranks, which CPU devices (index None) cannot
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @override
    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not isinstance(self.accelerator, CPUAccelerator):
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # Lightning passes the CUDA device index, None on CPU; DeepSpeed wants the local rank there
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer

    @property
    def offloads_optimizer(self) -> bool:
        offload = (self.config or {}).get("zero_optimization", {}).get("offload_optimizer") or {}
        return offload.get("device", "none") not in ("none", None)

    def optimizer_for_offload(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """With the optimizer offloaded to CPU: torch Adam/AdamW -> DeepSpeed's CPU Adam on the same parameter groups
        and hyperparameters (AdamW's decoupled weight decay kept); another optimizer runs as it is on the offloaded
        fp32 partitions (slow: allowed with a warning). Without offload, `optimizer` unchanged."""
        if not self.offloads_optimizer:
            return optimizer
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            log.warning("DeepSpeed optimizer offload with %s: it steps on the CPU copies as it is (DeepSpeed's CPU "
                        "Adam is much faster; use torch.optim.AdamW to get it)", type(optimizer).__name__)
            self.config["zero_force_ds_cpu_optimizer"] = False
            return optimizer
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        defaults = optimizer.defaults
        if defaults.get("amsgrad"):
            raise ValueError("DeepSpeed's CPU Adam has no amsgrad; set amsgrad: false in model.optimizer")
        groups = [{k: v for k, v in g.items() if k in ("params", "lr", "betas", "eps", "weight_decay")}
                  for g in optimizer.param_groups]
        return DeepSpeedCPUAdam(groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"],
                                weight_decay=defaults["weight_decay"], adamw_mode=type(optimizer) is torch.optim.AdamW)


def refuse_unsupported_strategy(strategy) -> None:
    """Refuse Lightning's FSDP1 `FSDPStrategy` (see the module docstring), naming what to use instead."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            "trainer.strategy: Lightning's FSDPStrategy (FSDP1) is not supported: our RL modules optimise manually and "
            "FSDP1 fails at their first backward (Lightning issues #19626, #19685), it wraps the LightningModule so "
            "weight sync and the HF export would read flat shards, and it refuses gradient clipping. Use "
            "configs/strategy/fsdp2.yaml (FSDP2: qed_lightning.parallel.FSDP2Strategy), or DeepSpeed: "
            "configs/strategy/deepspeed_zero2.yaml, deepspeed_zero3.yaml, deepspeed_zero3_offload.yaml.")
