"""GroupStream (rollout/layouts/streaming.py) with a gated fake generator: the test decides when each group finishes, so
which groups a step takes is exact, not a matter of thread timing."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from qed_lightning.data.records import ProofProblem
from qed_lightning.rollout import Completion, GroupStream, RolloutEngine, SamplingConfig

G = 2


class GatedEngine(RolloutEngine):
    """Problem n's group finishes when gate n opens; each sample carries the weights' version at its start."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.policy_version = 0
        self.gates: dict[int, threading.Event] = {}
        self.calls: list[int] = []
        self.fail_on = fail_on
        self._lock = threading.Lock()

    def gate(self, n: int) -> threading.Event:
        with self._lock:
            return self.gates.setdefault(n, threading.Event())

    def open(self, *ns: int) -> None:
        for n in ns:
            self.gate(n).set()

    def generate(self, prompts, sampling, n=1):
        (prompt,) = prompts
        index = prompt[0]
        version = self.policy_version
        with self._lock:
            self.calls.append(index)
        if index == self.fail_on:
            raise ConnectionError("server went away")
        assert self.gate(index).wait(30), f"gate {index} never opened"
        return [[Completion(list(prompt), [7, 8], [-0.5, -0.5], "stop", "x", version) for _ in range(n)]]

    def load_weights(self, named_tensors):
        pass


def _problem(n: int) -> ProofProblem:
    return ProofProblem(n, f"problem {n}", "rubric", prompt_ids=[n])


def _grade(prompts, rollouts):
    reward = float(prompts[0].index)
    return torch.full((len(rollouts),), reward), torch.ones(len(rollouts), dtype=torch.bool), [None] * len(rollouts)


def _stream(engine: GatedEngine, P: int, max_lag: int, expand=None) -> GroupStream:
    return GroupStream(engine, P, G, max_lag, source=_problem, expand=expand or (lambda p, release: [p]),
                       sampling=lambda ps, release: SamplingConfig(seeds=tuple(1000 * release + p.index for p in ps)),
                       grade=_grade, poll_s=0.01)


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _complete(stream: GroupStream) -> set[int]:
    with stream._cond:
        return {g.key[0] for g in stream.pending.values() if g.done >= 0}


def _indices(step) -> list[int]:
    return [p.index for p in step.prompts]


def test_a_step_takes_the_first_complete_groups_and_the_rest_carry_over():
    engine = GatedEngine()
    stream = _stream(engine, P=2, max_lag=1)
    stream.start()
    _wait_for(lambda: sorted(engine.calls) == [0, 1, 2, 3])  # releases 0 and 1 start on version-0 weights
    engine.open(2, 1)
    step0 = stream.take(0)
    # problem 0, the first of release 0, is still generating: the step holds the first two complete groups instead
    assert _indices(step0) == [1, 2]
    assert step0.rewards.tolist() == [1.0, 1.0, 2.0, 2.0] and len(step0.rollouts) == 2 * G  # complete groups only
    assert step0.metrics["rollout/inflight_groups"] == 2.0 and step0.metrics["rollout/carried_groups"] == 0.0
    engine.policy_version = 1  # the trainer pushed its step-0 weights: release 2 may start
    _wait_for(lambda: 4 in engine.calls and 5 in engine.calls)
    engine.open(3)
    _wait_for(lambda: _complete(stream) == {3})
    engine.open(0)
    _wait_for(lambda: _complete(stream) == {0, 3})
    step1 = stream.take(1)
    assert _indices(step1) == [0, 3]  # the carried groups, in submission order; each trained once
    assert step1.metrics["rollout/policy_lag_frac_1"] == 1.0 and step1.metrics["rollout/policy_lag_mean"] == 1.0
    assert [e[:1] + e[2:] for e in stream.ledger] == [[1, 0], [2, 0], [0, 1], [3, 1]]
    stream.close()
    engine.open(*range(10))


def test_groups_beyond_max_lag_are_dropped_counted_and_regenerated_on_the_current_weights():
    engine = GatedEngine()
    engine.open(*range(10))
    stream = _stream(engine, P=1, max_lag=0)
    stream.start()
    _wait_for(lambda: _complete(stream) == {0})  # generated on version 0, not taken
    engine.policy_version = 2  # two pushes later
    step = stream.take(2)
    # problem 0's group is 2 versions old: its G samples are dropped and regenerated; whatever the step trains on
    # is on-policy
    assert step.metrics["rollout/stale_dropped"] == float(G)
    assert [c.policy_version for c in step.rollouts] == [2] * G
    _wait_for(lambda: engine.calls.count(0) == 2)
    stream.close()


def test_a_rejected_group_is_replaced_by_the_next_problem_of_the_order():
    engine = GatedEngine()
    engine.open(*range(10))
    stream = _stream(engine, P=2, max_lag=0)
    stream.start()
    # dynamic sampling's hook: problem 1's group carries no signal (say), so it leaves and problem 2 comes in
    step = stream.take(0, accept=lambda group: group.prompt.index != 1)
    assert _indices(step) == [0, 2]
    assert step.metrics["rollout/skipped_groups"] == 1.0
    assert [e[0] for e in stream.ledger] == [1, 0, 2] and stream.ledger[0][2] == -1  # the skip is on the ledger too
    stream.close()


def test_a_restored_stream_trains_every_released_group_exactly_once():
    engine = GatedEngine()
    stream = _stream(engine, P=2, max_lag=1)
    stream.start()
    engine.open(0, 1)
    assert _indices(stream.take(0)) == [0, 1]
    engine.open(2)
    _wait_for(lambda: _complete(stream) == {2})
    engine.policy_version = 1
    _wait_for(lambda: {4, 5} <= set(engine.calls))
    state = stream.state_dict()  # the checkpoint: problem 2 complete, 3-5 generating; then the run dies
    stream.close()
    assert [p[0] for p in state["pending"]] == [2, 3, 4, 5] and state["cursor"] == 6 and state["released"] == 3

    engine2 = GatedEngine()
    engine2.policy_version = 1  # the restored weights
    engine2.open(*range(20))
    resumed = _stream(engine2, P=2, max_lag=1)
    resumed.load_state_dict(state)
    resumed.start()
    for step in range(1, 5):
        resumed.take(step)
        engine2.policy_version = step + 1
    trained = [e[0] for e in resumed.ledger if e[2] >= 0]
    assert len(trained) == len(set(trained)) == 10  # 5 steps x 2 groups, none twice
    assert set(trained) <= set(range(resumed.cursor))
    # every released problem is trained or still on its way: nothing lost
    assert set(trained) | {g.key[0] for g in resumed.pending.values()} | set(resumed.unexpanded) == \
        set(range(resumed.cursor))
    assert {2, 3, 4, 5} <= set(trained)  # the checkpoint's pending groups were generated again and trained
    resumed.close()
    engine.open(*range(20))


def test_an_expansion_into_several_prompts_streams_each_as_its_own_group():
    engine = GatedEngine()
    engine.open(*range(100))
    # stage 3's shape: one problem becomes two GRPO prompts (two RC states)
    stream = _stream(engine, P=2, max_lag=0,
                     expand=lambda p, release: [ProofProblem(p.index, p.problem, p.rubric,
                                                             prompt_ids=[10 * p.index + k], cycle=k)
                                                for k in range(2)])
    stream.start()
    step = stream.take(0)
    assert len(step.prompts) == 2 and {tuple(e[:2]) for e in stream.ledger} <= {(0, 0), (0, 1), (1, 0), (1, 1)}
    stream.close()


def test_a_failing_generator_fails_the_step_that_waits_for_it():
    engine = GatedEngine(fail_on=1)
    engine.open(0)
    stream = _stream(engine, P=2, max_lag=0)
    stream.start()
    with pytest.raises(RuntimeError, match="rollout stream failed") as info:
        stream.take(0, timeout_s=30)
    assert isinstance(info.value.__cause__, ConnectionError)
    stream.close()


def test_a_stalled_or_dead_generator_fails_the_waiting_step_within_its_bounds():
    """`take` never waits forever (issue 19): no group for `stall_timeout_s` raises the engine's account of what it
    waits on; a dead engine (its `check_alive` raises, as `LocalVLLMPool`'s does for a dead server) is reported within
    `liveness_s`, with nothing in flight to fail."""
    engine = GatedEngine()  # no gate opens: nothing ever completes
    stream = GroupStream(engine, 2, G, 0, source=_problem, expand=lambda p, release: [p],
                         sampling=lambda ps, release: SamplingConfig(), grade=_grade, poll_s=0.01,
                         stall_timeout_s=1.0, liveness_s=0.2)
    stream.start()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"GatedEngine produced nothing for \d+ s \(weight version 0\)"):
        stream.take(0)
    assert 1.0 <= time.monotonic() - started < 5.0

    def dead(stalled_s=None):
        raise RuntimeError("vLLM server http://127.0.0.1:1 (log x.log) exited with code -9")

    engine.check_alive, stream.stall_timeout_s = dead, 3600.0
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code -9"):
        stream.take(0)
    assert time.monotonic() - started < 3.0
    stream.close()
    engine.open(*range(10))


def test_the_streams_source_is_the_loaders_order_across_epochs():
    from qed_lightning.data.rl import ProblemBatches

    problems = [_problem(n) for n in range(10)]
    loader = ProblemBatches(problems, batch_size=3, seed=4)  # 3 full batches an epoch, one problem left over
    batches = [b for _ in range(3) for b in loader]  # three passes = three epochs
    streamed = [loader.problem_at(n) for n in range(27)]
    assert [p.index for b in batches for p in b] == [p.index for p in streamed]


def test_problem_at_with_spares_reads_prompts_and_spares_alike_unmarked():
    from qed_lightning.data.rl import ProblemBatches

    problems = [_problem(n) for n in range(10)]
    loader = ProblemBatches(problems, batch_size=2, seed=4, spares=1)  # width 3: 3 batches an epoch, one left over
    batches = [b for _ in range(2) for b in loader]
    streamed = [loader.problem_at(n) for n in range(18)]
    assert [p.index for b in batches for p in b] == [p.index for p in streamed]
    assert not any(p.spare for p in streamed) and any(p.spare for b in batches for p in b)
