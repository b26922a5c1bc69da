"""The one home of the distributed helpers: this process's rank and the world size (1 without a process group),
barriers, object gathers and broadcasts, full parameters of a sharded model one at a time, "is this strategy
DeepSpeed / ZeRO-3?" by `isinstance` (so a user's subclass of a strategy is recognised too), and the bounded,
phase-aware meeting of the ranks before an RL step's first collective (`StepRendezvous`).

Inside a Lightning hook prefer the trainer's own (`trainer.world_size`, `strategy.reduce`, `all_gather`); these are
for code that runs outside one (engines, callbacks' helpers, metric tables) or that must work without a trainer.
"""

from __future__ import annotations

import json
import time
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


def end_launched_ranks(strategy: object) -> None:
    """Kill the ranks Lightning's own launcher started from this process (one node, `trainer.devices` > 1: rank 0
    starts the others), which Lightning leaves running when rank 0 stops on an ordinary error. Under `srun` or
    `torchrun` there are none here: their launcher ends every task of a failed job."""
    for proc in getattr(getattr(strategy, "launcher", None), "procs", None) or []:
        proc.kill()  # a process that already ended is skipped


class StepWaitTimeout(RuntimeError):
    """Some ranks did not reach a step's first collective within the bound: names them and the phase each is in."""


class StepRendezvous:
    """A bounded meeting of every rank before the first collective of an RL step, outside the collectives.

    Ranks generate and grade on their own before a step's first collective (the all-gather of its token counts); a
    rank that finishes early then waits inside that collective, where the collective timeout (the watchdog) kills
    the job with a message that does not say why. Instead every rank calls `wait(step)` first: it marks itself ready
    in the process group's key-value store (plain TCP, no collective, no watchdog) and polls until every rank is, for
    at most `timeout_s`; past it, `StepWaitTimeout` names the ranks not yet there, the phase each is in, since when,
    and `knob`. Each rank records its phase as it enters it: the instance is a `StepPhases` listener
    (`phase_started`), so "generate", "grade" and "wait" (the streaming layout) are what the error reports.

    Args:
        timeout_s: the bound (0 = no rendezvous: the collective timeout alone applies).
        knob: the setting's name, for the error.
        poll_s: seconds between polls of the store.
    """

    def __init__(self, timeout_s: float, knob: str, poll_s: float = 0.5) -> None:
        if timeout_s < 0:
            raise ValueError(f"{knob} must be >= 0 (0 = no bound), got {timeout_s}")
        self.timeout_s, self.knob, self.poll_s = timeout_s, knob, poll_s
        self.rounds = 0  # rendezvous so far: every rank meets once per RL step (a skipped step keeps its number)
        self._store = None

    def _active(self) -> bool:
        return self.timeout_s > 0 and world_size() > 1

    def store(self):
        if self._store is None:
            from torch.distributed.distributed_c10d import _get_default_store

            self._store = torch.distributed.PrefixStore("qed/step_rendezvous/", _get_default_store())
        return self._store

    def _record(self, phase: str, step: int | None = None) -> None:
        if self._active():
            self.store().set(f"phase/{rank()}", json.dumps({"phase": phase, "step": step, "since": time.time()}))

    def phase_started(self, name: str, total: int | None) -> None:
        self._record(name)

    def wait(self, step: int) -> float:
        """Mark this rank ready for `step`'s first collective and wait for every rank (at most `timeout_s`); returns
        the seconds waited. Every rank must call it once per step, at the same point."""
        if not self._active():
            return 0.0
        store, key, world = self.store(), f"ready/{self.rounds}", world_size()
        self.rounds += 1
        self._record("ready", step)
        started = time.monotonic()
        arrived = store.add(key, 1)
        while True:
            if store.check(["failed"]):  # another rank gave up: the same error here
                raise StepWaitTimeout(store.get("failed").decode())
            if arrived >= world:
                return time.monotonic() - started
            if time.monotonic() - started > self.timeout_s:
                message = self._late(step, time.monotonic() - started)
                store.set("failed", message)  # the others stop at their next poll (or rendezvous) with it
                raise StepWaitTimeout(message)
            time.sleep(self.poll_s)
            arrived = store.add(key, 0)

    def _late(self, step: int, waited: float) -> str:
        """The error: which ranks are not ready, and the phase each recorded last."""
        store, now, late = self.store(), time.time(), []
        for other in range(world_size()):
            key = f"phase/{other}"
            state = json.loads(store.get(key)) if store.check([key]) else {"phase": "not started", "since": now}
            if state["phase"] != "ready" or state.get("step") != step:
                late.append(f"rank {other} in phase '{state['phase']}' (for {now - state['since']:.0f} s)")
        return (f"rank {rank()} waited {waited:.0f} s at step {step}'s first collective for the other ranks, longer "
                f"than {self.knob}={self.timeout_s:g} s: {'; '.join(late) or 'every rank arrived just now'}. A rank "
                "that is still generating or grading is slow (its rollouts are longer, or its judge is slower): "
                f"raise {self.knob}, or look at that rank's engine and judge.")
