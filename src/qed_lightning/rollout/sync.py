"""The callback that owns a rollout engine: starts it with the policy, pushes weights after optimizer steps.

Every `interval` optimizer steps it streams the policy's parameters (HF names, full tensors) into the engine and
bumps the engine's policy version to the trainer's global step, so each rollout records which weights produced it.
Under a sharded strategy the parameters are gathered one at a time (`iter_full_parameters`), never as a second full
copy of the model on one rank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from qed_lightning.rollout.base import RolloutEngine

log = logging.getLogger(__name__)


def iter_full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) for every parameter and buffer that a checkpoint holds, one at a time.

    DTensor shards (FSDP2) are gathered per parameter with `full_tensor()`, DeepSpeed ZeRO-3 partitions with
    `GatheredParameters` (a copy, since the gathered storage is released again); plain tensors are yielded as they
    are. Every rank must walk the whole iterator (each gather is a collective). Tied weights are yielded once (under
    the first name), as `save_pretrained` does.
    """
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in seen:
            continue
        seen.add(key)
        if hasattr(tensor, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):
                data = tensor.detach().clone()
        else:
            data = tensor.detach()
            if hasattr(data, "full_tensor"):
                data = data.full_tensor()
        yield name, data


class WeightSyncCallback(Callback):
    """Own `engine`: start it when training starts, sync weights every `interval` optimizer steps, close it at the end."""

    def __init__(self, engine: RolloutEngine, interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"weight sync interval must be >= 1, got {interval}")
        self.engine = engine
        self.interval = interval
        self.syncs = 0

    def _start(self, pl_module: L.LightningModule) -> None:
        start = getattr(self.engine, "start", None)
        if start is not None:
            start(pl_module.hparams.model_name_or_path)
        attach = getattr(self.engine, "attach", None)
        if attach is not None:
            attach(pl_module.model, pl_module.tokenizer)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """On a resumed run, push the restored weights: the engine started from `model_name_or_path`.
        (Not in `on_fit_start`: the step counter, and for sharded strategies the weights, are restored after it.)"""
        if trainer.global_step > 0 and self.engine.policy_version != trainer.global_step:
            self.sync(pl_module, trainer.global_step)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def sync(self, pl_module: L.LightningModule, version: int) -> float:
        started = time.perf_counter()
        self.engine.load_weights(iter_full_parameters(pl_module.model))
        self.engine.set_policy_version(version)
        self.syncs += 1
        return time.perf_counter() - started

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.interval != 0 or self.engine.policy_version == step:
            return
        elapsed = self.sync(pl_module, step)
        pl_module.log_dict({"rollout/sync_time_s": elapsed, "rollout/policy_version": float(step)}, batch_size=1)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.engine.close()
