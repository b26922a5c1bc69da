"""The engine of the one-node asynchronous layout: a generator that never stops, feeding a `GroupStream`.

`StreamingRollouts` wraps a generator that can be called from many threads at once and does not share the
trainer's policy module (`LocalVLLMPool`, the layout's default; or a `VLLMServerEngine` pool). When training starts,
its callback opens a `GroupStream` over the training data's order, bound to the module's hooks (`stream_prompts`,
`sampling`, `grade_rollouts`: the `RolloutHost` contract of `rollout.host`, checked there): from then on generation
and grading run in the background, and the module's
sampling step (`RubricRLModule.sample_and_grade`) takes each step's groups from the stream instead of generating
its batch (the loader's batch only paces the steps: the stream reads the same order with its own cursor, saved in
checkpoints by the callback). Weight pushes go to the generator as usual (`WeightSyncCallback`); the stream releases
new problems as the generator's weight version advances. Anything else that generates (validation, a callback)
is served directly by the generator, next to the stream's requests.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from qed_lightning.rollout.base import RolloutEngine, WrappingEngine
from qed_lightning.rollout.host import check_host
from qed_lightning.rollout.layouts.streaming import GroupStream


class StreamingRollouts(WrappingEngine):
    """Stream complete, graded groups to the trainer (see the module docstring and `rollout.streaming`).

    Args:
        engine: the generator (thread-safe, not the trainer's own policy module).
        max_lag: the most optimizer steps a trained sample's weights may be behind the trainer's (the paper: ~1);
            0 = the generator waits for every step's weights (sequential, same samples as the colocated layout).
        stall_timeout_s: a training step that waits this long without any group completing fails, with the
            engine's account of what it waits on (servers, logs, weight version); a generous bound for a paper
            step (a group of 8 x 49k tokens takes minutes on a pool).
        liveness_s: how often a waiting step checks the generator (dead server, failed weight load).
    """

    def __init__(self, engine: RolloutEngine, max_lag: int = 1, stall_timeout_s: float = 3600.0,
                 liveness_s: float = 10.0) -> None:
        super().__init__(engine, max_lag)
        if stall_timeout_s <= 0 or liveness_s <= 0:
            raise ValueError(f"StreamingRollouts: stall_timeout_s ({stall_timeout_s}) and liveness_s ({liveness_s}) "
                             "must be > 0")
        self.stall_timeout_s, self.liveness_s = stall_timeout_s, liveness_s
        self.stream: GroupStream | None = None

    def attach(self, policy, tokenizer) -> None:
        if self.engine.shares_policy:
            raise ValueError("StreamingRollouts generates while the trainer steps, so its engine cannot be the policy "
                             "module itself (HFEngine without `model`): use LocalVLLMPool or VLLMServerEngine")
        self.engine.attach(policy, tokenizer)

    def open_stream(self, stream: GroupStream, state: dict | None = None, min_version: int = 0) -> None:
        """Start `stream` (restored from a checkpoint's `state` if given) as this engine's group stream, generating
        once the engine holds weights of `min_version`."""
        self.close_stream()
        if state:
            stream.load_state_dict(state)
        self.stream = stream
        stream.start(min_version)

    def close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def group_stream(self) -> GroupStream | None:
        return self.stream

    @property
    def streams_groups(self) -> bool:
        return True

    def close(self) -> None:
        self.close_stream()
        self.engine.close()

    def callbacks(self) -> list[Callback]:
        return [StreamCallback(self)]


class StreamCallback(Callback):
    """Open the engine's `GroupStream` when training starts (bound to the module's hooks and the loader's order),
    close it when training ends, and carry its state in checkpoints."""

    def __init__(self, engine: StreamingRollouts) -> None:
        self.engine = engine
        self._restored: dict | None = None

    @property
    def state_key(self) -> str:
        return "StreamCallback"

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After `WeightSyncCallback.on_train_start` (the module lists it first), so a resumed run's stream starts
        from the restored weights."""
        loader = trainer.train_dataloader
        if not hasattr(loader, "problem_at"):
            raise ValueError("StreamingRollouts reads the training problems in the loader's order: use the RL data "
                             "module (ProofRLDataModule), whose loader has problem_at()")
        host = check_host(pl_module, "StreamingRollouts")
        stream = GroupStream(self.engine.engine, loader.batch_size, host.group_size, self.engine.max_lag,
                             source=loader.problem_at, expand=host.stream_prompts, sampling=host.sampling,
                             grade=host.grade_rollouts, stall_timeout_s=self.engine.stall_timeout_s,
                             liveness_s=self.engine.liveness_s)
        self.engine.open_stream(stream, self._restored, min_version=trainer.global_step)
        self._restored = None

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stream = self.engine.group_stream()
        self._restored = stream.state_dict() if stream is not None else self._restored  # for a checkpoint after this
        self.engine.close_stream()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A failed fit gets no `on_train_end`: stop the stream's threads, so none keeps asking a dead server."""
        self.engine.close_stream()

    @override
    def state_dict(self) -> dict:
        stream = self.engine.group_stream()
        return stream.state_dict() if stream is not None else dict(self._restored or {})

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict) if state_dict else None
