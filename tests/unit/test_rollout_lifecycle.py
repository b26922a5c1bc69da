"""The `RolloutEngine` lifecycle: no-op defaults, the order of a weight push, and the callbacks that drive engines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qed_lightning.rollout import FrozenEngineCallback, WeightSyncCallback
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig


class RecordingEngine(RolloutEngine):
    """Records every lifecycle call in order; generates nothing."""

    def __init__(self, discards: bool = False, handoff: bool = False) -> None:
        self.calls: list[str] = []
        self._discards, self._handoff = discards, handoff

    @property
    def sleep_discards_weights(self) -> bool:
        return self._discards

    @property
    def memory_handoff(self) -> bool:
        return self._handoff

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, n: int = 1) -> list[list[Completion]]:
        return [[] for _ in prompts]

    def load_weights(self, named_tensors) -> None:
        self.calls.append(f"load:{len(list(named_tensors))}")

    def wake_up(self, tags=None) -> None:
        self.calls.append(f"wake:{','.join(tags or ('all',))}")


class Bare(RolloutEngine):
    def generate(self, prompts, sampling, n=1):
        return []

    def load_weights(self, named_tensors) -> None:
        list(named_tensors)


def test_lifecycle_defaults_are_no_ops():
    engine = Bare()
    engine.start("some/model")
    engine.attach(torch.nn.Linear(2, 2), tokenizer=None)
    engine.sleep()
    engine.wake_up()
    engine.close()
    assert engine.max_model_len is None and engine.callbacks() == []
    assert (engine.memory_handoff, engine.shares_policy, engine.sleep_discards_weights) == (False, False, False)


def test_push_wakes_weights_then_loads_then_wakes_the_kv_cache():
    engine = RecordingEngine()
    times = engine.push_weights(iter([("a", torch.zeros(1)), ("b", torch.ones(2))]), version=7)
    assert engine.calls == ["wake:weights", "load:2", "wake:kv_cache"]
    assert engine.policy_version == 7 and set(times) == {"wake_s", "load_s"} and min(times.values()) >= 0


class Module(torch.nn.Module):
    """What the weight-sync callback uses of an RL module."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(3, 2)
        self.tokenizer = "tok"
        self.hparams = SimpleNamespace(model_name_or_path="policy/path")
        self.logged: list[dict[str, float]] = []

    def log_dict(self, values, **kwargs) -> None:
        self.logged.append(dict(values))


def test_weight_sync_runs_the_handoff_then_pushes_each_sync_step_once():
    engine = RecordingEngine(handoff=True)
    module = Module()
    module.model.weight.grad = torch.ones(2, 3)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    callback = WeightSyncCallback(engine, interval=2)
    trainer = SimpleNamespace(global_step=1, optimizers=[optimizer], callbacks=[callback])
    callback.on_train_batch_end(trainer, module, None, None, 0)  # not a sync step: the hand-off only
    assert engine.calls == [] and module.model.weight.grad is None
    assert module.logged[-1]["memory/handoff"] == 1.0
    trainer.global_step = 2
    module.model.weight.grad = torch.ones(2, 3)
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert module.model.weight.grad is None  # freed before the engine wakes
    assert engine.calls == ["wake:weights", "load:2", "wake:kv_cache"] and engine.policy_version == 2
    assert {"memory/handoff", "rollout/wake_s", "rollout/sync_time_s"} <= set(module.logged[-1])
    assert WeightSyncCallback.owner(trainer, engine).push(trainer, module) == {}  # this step's weights are there
    assert callback.syncs == 1


class SleepingEngine(RecordingEngine):
    """`RecordingEngine` with `VLLMEngine`'s sleep bookkeeping: what sleeps, and whether the weights went with it."""

    def __init__(self, level: int) -> None:
        super().__init__(discards=level == 2, handoff=True)
        self._asleep: set[str] = set()

    @property
    def sleeping(self) -> frozenset[str]:
        return frozenset(self._asleep)

    def sleep(self) -> None:
        self._asleep = {"weights", "kv_cache"}
        self.calls.append("sleep")

    def wake_up(self, tags=None) -> None:
        super().wake_up(tags)
        self._asleep -= set(tags or ("weights", "kv_cache"))


@pytest.mark.parametrize("level", [1, 2])
def test_a_skipped_step_leaves_the_engine_awake_with_the_trainers_weights(level):
    """A non-finite step skips the optimizer step, so `global_step` (the version to push) does not move. An engine
    whose sleep discarded the weights (level 2) gets the same ones again; one that kept them (level 1) is woken."""
    engine, module = SleepingEngine(level), Module()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    callback = WeightSyncCallback(engine, interval=1)
    trainer = SimpleNamespace(global_step=0, optimizers=[optimizer], callbacks=[callback])
    for step in (0, 1):  # the first step (global step 0) skipped, then a step after a finite one
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, 0)  # a finite step ends at global_step = step
        engine.calls.clear()
        engine.sleep()  # the next step sampled, slept, and was skipped: global_step stays
        module.model.weight.grad = torch.ones(2, 3)
        callback.on_train_batch_end(trainer, module, None, None, 0)
        assert engine.sleeping == frozenset() and engine.policy_version == step
        assert module.model.weight.grad is None  # the hand-off ran before the wake
        expected = ["wake:weights", "load:2", "wake:kv_cache"] if level == 2 else ["wake:all"]
        assert engine.calls == ["sleep", *expected]
        assert module.logged[-1]["memory/handoff"] == 1.0 and "rollout/wake_s" in module.logged[-1]
    callback.on_train_batch_end(trainer, module, None, None, 0)  # awake and in step: nothing more to do
    assert engine.calls == ["sleep", *expected]


def test_weight_sync_refuses_an_interval_when_sleep_discards_the_weights():
    with pytest.raises(ValueError, match="sync_interval=2.*sleep_level: 1"):
        WeightSyncCallback(RecordingEngine(discards=True), interval=2)
    WeightSyncCallback(RecordingEngine(discards=True), interval=1)


def test_owner_lookup_names_the_missing_callback():
    with pytest.raises(RuntimeError, match="no WeightSyncCallback owns this engine"):
        WeightSyncCallback.owner(SimpleNamespace(callbacks=[]), Bare())


def test_frozen_engine_callback_starts_with_its_own_model_and_never_pushes(tiny_model_dir):
    class Frozen(RecordingEngine):
        def start(self, model=None):
            self.calls.append(f"start:{model}")

        def attach(self, policy, tokenizer):
            self.calls.append(f"attach:{type(tokenizer).__name__}")

        def close(self):
            self.calls.append("close")

    engine = Frozen()
    callback = FrozenEngineCallback(engine, str(tiny_model_dir))
    callback.setup(None, Module(), "fit")
    callback.teardown(None, Module(), "fit")
    assert engine.calls[0] == f"start:{tiny_model_dir}" and engine.calls[1].startswith("attach:")
    assert engine.calls[2:] == ["close"]  # no wake, load or push in between
