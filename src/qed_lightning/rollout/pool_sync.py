"""Weight pushes to a pool of vLLM servers: every full parameter gathered once, and sent to every server.

A sharded trainer (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions) holds no full parameter anywhere; each must be
gathered (a collective on every trainer rank) before a server can take it. Both sync paths gather each parameter
once per push, whatever the number of servers:
- `sync: checkpoint`: rank 0 streams the gathered parameters into one safetensors checkpoint (`write_safetensors`,
  at most one shard in memory) in a directory every server reads; each server then reloads from it.
- `sync: nccl`: one NCCL group spans trainer rank 0 and every worker of every server: server i's workers take ranks
  `rank_offsets(...)[i]` onwards, rank 0 broadcasts each gathered parameter once and all servers receive it. vLLM's
  `NCCLTrainerWeightTransferEngine` drives one client; `PoolWeightSyncClient` is that client for a whole pool (it
  fans the four RPCs out to every server, each told its own rank offset). Before, one group per server meant one
  gather and one send of the whole model per server.
The parameters come from `FullParameterSource` (vLLM's `WeightSource` protocol): metadata without gathering (a
DTensor's global shape, a ZeRO-3 partition's `ds_shape`; vLLM's own `ModuleSource` reads `p.shape`, which is
`(0,)` for a ZeRO-3 partition) and iteration through `iter_full_parameters`, so both channels list the same
entries in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qed_lightning.parallel.distributed import checkpoint_entries, full_shape, iter_full_parameters


def write_safetensors(named_tensors: Iterable[tuple[str, Tensor]], out: Path | None, shard_bytes: int = 2**30,
                      dtype: torch.dtype | None = None) -> int:
    """Stream (name, tensor) pairs into safetensors shards of about `shard_bytes` plus their index; returns the bytes
    written. Floating-point tensors are cast to `dtype` (the servers' dtype: fp32 master weights would double the
    bytes of a bf16 server) on their own device, before the copy to the host. With `out=None` the pairs are only
    consumed (the other ranks of a sharded trainer take part in each parameter's gather). At most one shard is held
    in memory."""
    from safetensors.torch import save_file

    shard: dict[str, Tensor] = {}
    weight_map: dict[str, str] = {}
    size = total = 0
    files = 0

    def flush() -> None:
        nonlocal shard, size, files
        if shard:
            files += 1
            name = f"model-{files:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for name, tensor in named_tensors:
        if out is None:
            continue
        data = cast(tensor.detach(), dtype).to("cpu").contiguous()
        shard[name] = data
        size += data.numel() * data.element_size()
        total += data.numel() * data.element_size()
        if size >= shard_bytes:
            flush()
    if out is not None:
        flush()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """`tensor` in `dtype` if it is floating point and a dtype is given (integer buffers keep theirs)."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def rank_offsets(worker_counts: list[int]) -> list[int]:
    """First rank of each server's workers in one broadcast group whose rank 0 is the trainer.

    >>> rank_offsets([1, 1, 2]), 1 + sum([1, 1, 2])  # offsets, and the group's world size
    ([1, 2, 3], 5)
    """
    offsets, first = [], 1
    for count in worker_counts:
        offsets.append(first)
        first += count
    return offsets


class PoolWeightSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol for a pool: each call goes to every server at once (the servers
    rendezvous with the trainer inside the same NCCL calls, so none may wait for another's reply); the init info
    each server gets carries its own `rank_offset`."""

    def __init__(self, clients: list, worker_counts: list[int]) -> None:
        if len(clients) != len(worker_counts):
            raise ValueError(f"{len(clients)} server clients but {len(worker_counts)} worker counts")
        self.clients, self.offsets = clients, rank_offsets(worker_counts)

    def _all(self, call) -> None:
        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            for future in [pool.submit(call, i, c) for i, c in enumerate(self.clients)]:
                future.result()

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all(lambda i, c: c.init_weight_transfer_engine({**init_info, "rank_offset": self.offsets[i]}))

    def start_weight_update(self) -> None:
        self._all(lambda i, c: c.start_weight_update())

    def update_weights(self, update_info) -> None:
        self._all(lambda i, c: c.update_weights(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all(lambda i, c: c.finish_weight_update(weight_version))


def full_parameter_meta(model: torch.nn.Module,
                        dtype: torch.dtype | None = None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, full shape) of every entry `iter_full_parameters(model)` yields, in its order, gathering
    nothing; floating-point entries in `dtype` if given (what `full_parameter_source` sends)."""
    return [(name, dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype, full_shape(tensor))
            for name, tensor in checkpoint_entries(model)]


def full_parameter_source(model: torch.nn.Module, dtype: torch.dtype | None = None):
    """`model`'s parameters as a vLLM `WeightSource` (see the module docstring), floating-point ones cast to `dtype`
    (the servers': half the bytes of fp32 masters over NCCL for bf16 servers); vLLM is imported on use."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class FullParameterSource(WeightSource):
        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(name, dt, shape) for name, dt, shape in full_parameter_meta(model, dtype)]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            return ((name, cast(tensor, dtype)) for name, tensor in iter_full_parameters(model))

    return FullParameterSource()
