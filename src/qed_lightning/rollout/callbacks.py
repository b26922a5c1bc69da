"""The callbacks that own rollout engines, driving them through the `RolloutEngine` lifecycle only.

`WeightSyncCallback` owns the policy's engine: `start` and `attach` when training (or validation) starts; after
every optimizer step the memory hand-off for a colocated engine (`rollout.handoff`: gradients and allocator cache
freed); every `interval` steps `push_weights` of the policy's parameters (HF names, full tensors), which bumps the
engine's policy version to the trainer's global step, so each rollout records which weights produced it. A step
skipped as non-finite leaves the global step (and the weights) where they were: the engine is then woken, and given
the same weights again where its sleep discarded them (`sleep_level` 2), so the next step can generate. Under a
sharded strategy the parameters are gathered one at a time (`iter_full_parameters`), never as a second full copy of
the model on one rank; every rank walks them (each gather is a collective), and each rank's engine (or rank 0, for
a server pool) takes them. Other callbacks that need the current weights (the evaluation callback) ask the owner
(`WeightSyncCallback.owner(trainer, engine).push(...)`) rather than pushing themselves.

`FrozenEngineCallback` owns an engine that never receives policy weights (a separate summarizer): `start` with its
own model, `attach`, `close`.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from qed_lightning.parallel.distributed import iter_full_parameters
from qed_lightning.metrics import StepPhases
from qed_lightning.rollout.base import RolloutEngine
from qed_lightning.rollout.handoff import free_training_memory

log = logging.getLogger(__name__)


class WeightSyncCallback(Callback):
    """Own the policy's `engine`: start it, hand memory over and push weights every `interval` steps, close it."""

    def __init__(self, engine: RolloutEngine, interval: int = 1, phases: StepPhases | None = None) -> None:
        if interval < 1:
            raise ValueError(f"weight sync interval must be >= 1, got {interval}")
        if interval > 1 and engine.sleep_discards_weights:
            raise ValueError(f"model.sync_interval={interval}, but the engine sleeps at level 2, which discards its "
                             "weights while the trainer steps, so they must be pushed after every step: set "
                             "model.sync_interval=1 or the engine's sleep_level: 1 (keeps a host copy)")
        self.engine = engine
        self.interval = interval
        self.phases = phases  # the owning module's step phases (`RolloutHost.phases`), if it times its steps
        self.syncs = 0
        self.restored_step: int | None = None  # the global step of a checkpoint Lightning restored (fit or validate)

    @staticmethod
    def owner(trainer: L.Trainer, engine: RolloutEngine) -> WeightSyncCallback:
        """The trainer's callback that owns `engine`."""
        for callback in trainer.callbacks:
            if isinstance(callback, WeightSyncCallback) and callback.engine is engine:
                return callback
        raise RuntimeError("no WeightSyncCallback owns this engine: the module must return one from "
                           "configure_callbacks (RubricRLModule does)")

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.engine.use_run_dir(Path(trainer.default_root_dir))  # where its temporary files go
        self.engine.start(pl_module.hparams.model_name_or_path)
        self.engine.attach(pl_module.model, pl_module.tokenizer)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """On a resumed run, push the restored weights: the engine started from `model_name_or_path`.
        (Not in `on_fit_start`: the step counter, and for sharded strategies the weights, are restored after it.)"""
        if trainer.global_step > 0 and self.engine.policy_version != trainer.global_step:
            self.engine.push_weights(iter_full_parameters(pl_module.model), trainer.global_step)
            self.syncs += 1

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.restored_step = int(checkpoint.get("global_step", 0))

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the engine; when Lightning restored a checkpoint (`qed-fit validate --ckpt_path`, or the sanity check
        of a resumed fit), push its weights first: the engine started from `model_name_or_path`, and would otherwise
        score the starting model."""
        self._start(trainer, pl_module)
        if self.restored_step is None:
            return
        fitting = trainer.state.fn == "fit"
        version = trainer.global_step if fitting else self.restored_step
        if self.engine.policy_version != version or (not fitting and self.syncs == 0):
            self.engine.push_weights(iter_full_parameters(pl_module.model), version)
            self.syncs += 1

    def push(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Give the engine this step's weights (the hand-off first, for a colocated engine) and log it. When it has
        them already (a second push in the same step, or a skipped non-finite step, after which `global_step` did
        not move): nothing is pushed, but an engine left asleep is woken, and one whose sleep discarded its weights
        (level 2) gets the same weights again, so it can generate. Returns the logged metrics."""
        step = trainer.global_step
        discarded = self.engine.sleep_discards_weights and "weights" in self.engine.sleeping
        if self.engine.policy_version == step and not discarded:
            return self._wake(trainer, pl_module)
        metrics = free_training_memory(pl_module, trainer.optimizers) if self.engine.memory_handoff else {}
        started = time.perf_counter()
        with self.phases.phase("sync") if self.phases is not None else nullcontext():  # the progress bar shows "sync"
            times = self.engine.push_weights(iter_full_parameters(pl_module.model), step)
        self.syncs += 1
        metrics.update({"rollout/sync_time_s": time.perf_counter() - started,
                        "rollout/wake_s": times.get("wake_s", 0.0), "rollout/policy_version": float(step)})
        if "push_bytes" in times:  # what the push wrote or sent (an engine that knows)
            metrics["rollout/push_bytes"] = times["push_bytes"]
        pl_module.log_dict(metrics, batch_size=1)
        return metrics

    def _wake(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Wake an engine that slept keeping the weights it has (level 1), the hand-off first; nothing when awake."""
        if not self.engine.sleeping:
            return {}
        metrics = free_training_memory(pl_module, trainer.optimizers) if self.engine.memory_handoff else {}
        started = time.perf_counter()
        self.engine.wake_up()
        metrics["rollout/wake_s"] = time.perf_counter() - started
        pl_module.log_dict(metrics, batch_size=1)
        return metrics

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.engine.policy_version == step or (step > 0 and step % self.interval == 0):  # a skipped step: woken
            self.push(trainer, pl_module)
        elif self.engine.memory_handoff:  # no push: the engine wakes whole
            pl_module.log_dict(free_training_memory(pl_module, trainer.optimizers), batch_size=1)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.engine.close()  # after fit, validate or test alike (a validation inside fit does not tear down)


class FrozenEngineCallback(Callback):
    """Own a frozen engine (a separate summarizer): start it with its own `model`, attach it (an `HFEngine` copy
    decodes with that model's tokenizer), close it at the end. It never pushes policy weights."""

    def __init__(self, engine: RolloutEngine, model: str) -> None:
        self.engine = engine
        self.model = model

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from transformers import AutoTokenizer

        self.engine.start(self.model)
        self.engine.attach(pl_module.model, AutoTokenizer.from_pretrained(self.model))

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.engine.close()
