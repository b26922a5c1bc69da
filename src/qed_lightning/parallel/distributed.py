"""The one home of the distributed helpers: this process's rank and the world size (1 without a process group),
barriers, object gathers and broadcasts, full parameters of a sharded model one at a time, and "is this strategy
DeepSpeed / ZeRO-3?" by `isinstance` (so a user's subclass of a strategy is recognised too).

Inside a Lightning hook prefer the trainer's own (`trainer.world_size`, `strategy.reduce`, `all_gather`); these are
for code that runs outside one (engines, callbacks' helpers, metric tables) or that must work without a trainer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy


def is_distributed() -> bool:
    """Whether a torch process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if is_distributed():
        torch.distributed.barrier()


def gather_objects(obj: Any) -> list:
    """Every rank's `obj`, in rank order (`[obj]` without a process group)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (`obj` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def is_deepspeed(strategy: object) -> bool:
    """Whether `strategy` is Lightning's `DeepSpeedStrategy` (ours, `qed_lightning.parallel.DeepSpeedStrategy`, and a
    user's subclass included)."""
    return isinstance(strategy, DeepSpeedStrategy)


def is_zero3(strategy: object) -> bool:
    """Whether `strategy` is DeepSpeed with ZeRO stage 3 (parameters partitioned over ranks)."""
    return is_deepspeed(strategy) and strategy.zero_stage_3


def deepspeed_engine(strategy: object):
    """The `DeepSpeedEngine` of a DeepSpeed strategy, else None."""
    return strategy.deepspeed_engine if is_deepspeed(strategy) else None


def checkpoint_entries(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, local tensor) of every parameter and buffer a checkpoint holds, tied weights once (under the first name,
    as `save_pretrained` does). Nothing is gathered."""
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tensor


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The full (unsharded) shape: a DTensor's global shape, a ZeRO-3 partition's `ds_shape` (its local shape is
    `(0,)`), else the tensor's own."""
    return tuple(getattr(tensor, "ds_shape", None) or tensor.shape)


def iter_full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) for every entry of `checkpoint_entries`, one at a time.

    DTensor shards (FSDP2) are gathered per parameter with `full_tensor()`, DeepSpeed ZeRO-3 partitions with
    `GatheredParameters` (a copy, since the gathered storage is released again); plain tensors are yielded as they
    are. Every rank must walk the whole iterator (each gather is a collective).
    """
    for name, tensor in checkpoint_entries(model):
        if hasattr(tensor, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):
                data = tensor.detach().clone()
        else:
            data = tensor.detach()
            if hasattr(data, "full_tensor"):
                data = data.full_tensor()
        yield name, data
