"""Streaming groups: generation and grading run continuously; a training step takes the first complete groups.

Paper (PipelineRL): generators never stop; a group (one prompt's G rollouts) enters the trainer's queue as soon as
its rollouts are generated and scored, and the trainer forms each batch from whatever groups are ready, so it never
waits for the slowest proof of "its" batch. `GroupStream` is that queue for one training process:

- problems come from the training data's own order (`source(n)`: the n-th problem of the run, as
  `ProofRLDataModule`'s loader orders them), in releases of `prompts_per_step`; release r may start once the
  generator holds weights of version >= r - `max_lag` (version v = after v optimizer steps). So with `max_lag` 0 the
  generator waits for every step's weights (the sequential layout, same problems and seeds), with 1 it generates
  step k+1's problems while the trainer trains on step k;
- each problem is expanded into GRPO prompts (`expand`: the problem itself in stage 2; stage 3's RC states), each
  prompt's G rollouts are generated in one request and graded as soon as they are back (`grade`, the module's
  `grade_rollouts`: judge calls overlap the generation of other groups);
- `take(step)` returns the first `prompts_per_step` complete groups in completion order (trained in data
  order, so a step does not depend on thread timing beyond which groups it holds); the others carry over. A complete
  group whose first token is more than `max_lag` versions behind the trainer is dropped, counted
  (`rollout/stale_dropped`, in samples) and generated again. `accept` (optional) filters groups at take time:
  rejected groups are counted (`rollout/skipped_groups`) and replaced by the next problem of the order, which is how
  dynamic sampling (skip groups whose rewards are all equal) composes with streaming;
- `state_dict` holds what a checkpoint needs so that a killed run loses and repeats no group: the release counter,
  the source cursor, every submitted-but-untrained prompt (generating, grading or complete: regenerated on resume,
  their samples are not saved) and the ledger of (problem position, prompt index, step) trained so far (step -1:
  rejected by `accept`).

`take` never waits forever: every `liveness_s` it asks the engine whether it can still make progress
(`check_alive`: a dead server, a failed weight load), and when no group has completed for `stall_timeout_s` it
raises the engine's account of what it waits on (`check_alive(stalled_s)`); either way one error naming the server,
its log file and the weight version (for `LocalVLLMPool`).

A sample's policy version is the weights' version of its first token (the engine's `Completion.policy_version`);
with PipelineRL's in-flight mixing (`update_mode: keep`) its last token's version is `end_version`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from qed_lightning.data.records import ProofProblem
from qed_lightning.metrics import Sum
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig

log = logging.getLogger(__name__)

Source = Callable[[int], ProofProblem]
Expand = Callable[[ProofProblem, int], list[ProofProblem]]
Sampling = Callable[[list[ProofProblem], int], SamplingConfig]
Grade = Callable[[list[ProofProblem], list[Completion]], tuple[torch.Tensor, torch.Tensor, list]]


@dataclass
class StreamGroup:
    """One GRPO prompt's group on its way through the stream."""

    key: tuple[int, int]  # (source position of its problem, index of the prompt in that problem's expansion)
    prompt: ProofProblem  # graded against its `problem` and `rubric`
    release: int  # the release it came with: its sampling is seeded by it, as a sequential step's by the step
    seq: int  # submission order: a step trains its groups in this order
    attempt: int = 0  # regenerations after stale drops
    done: int = -1  # completion order; -1 = generating or grading
    rollouts: list[Completion] = field(default_factory=list)
    rewards: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    grades: list = field(default_factory=list)

    @property
    def start_version(self) -> int:
        return min(c.policy_version for c in self.rollouts)


@dataclass
class StepGroups:
    """What `take` hands a step: its prompts, their rollouts (G adjacent per prompt), rewards `[P*G]`, validity
    `[P*G]`, grades, and the stream's `rollout/*` metrics."""

    prompts: list[ProofProblem]
    rollouts: list[Completion]
    rewards: torch.Tensor
    valid: torch.Tensor
    grades: list
    metrics: dict[str, float]


class GroupStream:
    """Generate and grade groups in background threads; hand each step its first complete groups (module docstring).

    Args:
        engine: the generator; called from several threads at once (a server pool is).
        prompts_per_step: groups per step (P). group_size: rollouts per group (G). max_lag: staleness bound.
        source, expand, sampling, grade: the training data's n-th problem; a problem's GRPO prompts given its
            release; the sampling of prompts for a release; rewards, validity and grades of a group.
        poll_s: how often the feeder looks at the engine's weight version.
        stall_timeout_s: `take` raises when no group has completed for this long. liveness_s: how often `take`
            checks the engine while it waits (module docstring).
    """

    def __init__(self, engine: RolloutEngine, prompts_per_step: int, group_size: int, max_lag: int, source: Source,
                 expand: Expand, sampling: Sampling, grade: Grade, poll_s: float = 0.05,
                 stall_timeout_s: float = 3600.0, liveness_s: float = 10.0) -> None:
        self.engine, self.P, self.G, self.max_lag = engine, prompts_per_step, group_size, max_lag
        self.source, self.expand, self.sampling, self.grade = source, expand, sampling, grade
        self.poll_s, self.stall_timeout_s, self.liveness_s = poll_s, stall_timeout_s, liveness_s
        self._progress = time.monotonic()  # when a group last completed (or `take` began waiting)
        self.released = self.cursor = self.seq = 0
        self.pending: dict[tuple[int, int], StreamGroup] = {}  # submitted, not trained
        self.unexpanded: dict[int, tuple[ProofProblem, int]] = {}  # source position -> (problem, release)
        self.ledger: list[list[int]] = []  # [source position, prompt index, step] of every trained group
        self.last: StepGroups | None = None  # the groups the last `take` returned (for observers: benchmarks)
        self._cond = threading.Condition()
        self._done = 0
        self._error: BaseException | None = None
        self._closed = False
        self._counts = {"stale": 0, "skipped": 0}
        workers = max(4, 2 * prompts_per_step * (max_lag + 1))  # generous: each thread mostly waits on HTTP
        self._expanders = ThreadPoolExecutor(workers, thread_name_prefix="stream-expand")
        self._generators = ThreadPoolExecutor(workers, thread_name_prefix="stream-generate")
        self._feeder: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self, min_version: int = 0) -> None:
        """Once the engine holds weights of `min_version` (a resumed run's restored step, pushed just before),
        resubmit what a restored state left pending, then keep releasing as the weights allow."""
        self._feeder = threading.Thread(target=self._guard, args=(self._feed, min_version), name="stream-feeder",
                                        daemon=True)
        self._feeder.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._feeder is not None:
            self._feeder.join(timeout=10)
        for pool in (self._expanders, self._generators):
            pool.shutdown(wait=False, cancel_futures=True)

    def _guard(self, fn, *args) -> None:
        """Run a background job; its exception stops the stream and is raised by the next `take`."""
        try:
            fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the trainer's thread
            with self._cond:
                if not self._closed and self._error is None:
                    self._error = err
                self._cond.notify_all()

    # -- producing -----------------------------------------------------------------------------------------------

    def _feed(self, min_version: int) -> None:
        with self._cond:
            while self.engine.serving_version < min_version and not self._closed:
                self._cond.wait(self.poll_s)
            for n, (problem, release) in sorted(self.unexpanded.items()):
                self._expanders.submit(self._guard, self._expand_one, n, problem, release)
            for group in sorted(self.pending.values(), key=lambda g: g.seq):
                self._submit(group)
        while True:
            with self._cond:
                if self._closed:
                    return
                while self.released <= self.engine.serving_version + self.max_lag:
                    self._release(self.P, self.released)
                    self.released += 1
                self._cond.wait(self.poll_s)

    def _release(self, count: int, release: int) -> None:
        """Send the next `count` problems of the order to expansion (holding the lock)."""
        for n in range(self.cursor, self.cursor + count):
            problem = self.source(n)
            self.unexpanded[n] = (problem, release)
            self._expanders.submit(self._guard, self._expand_one, n, problem, release)
        self.cursor += count

    def _expand_one(self, n: int, problem: ProofProblem, release: int) -> None:
        prompts = self.expand(problem, release)  # stage 3: the RC loop, outside the lock
        with self._cond:
            if self._closed or self.unexpanded.pop(n, None) is None:
                return
            for j, prompt in enumerate(prompts):
                group = StreamGroup((n, j), prompt, release, self.seq)
                self.seq += 1
                self.pending[group.key] = group
                self._submit(group)

    def _submit(self, group: StreamGroup) -> None:
        self._generators.submit(self._guard, self._produce, group, group.attempt)

    def _produce(self, group: StreamGroup, attempt: int) -> None:
        sampling = self.sampling([group.prompt], group.release)
        rollouts = self.engine.generate([group.prompt.prompt_ids], sampling, n=self.G)[0]
        rewards, valid, grades = self.grade([group.prompt], rollouts)  # grading overlaps other groups' generation
        with self._cond:
            if self.pending.get(group.key) is not group or group.attempt != attempt:
                return
            group.rollouts, group.rewards, group.valid, group.grades = rollouts, rewards, valid, grades
            group.done, self._done = self._done, self._done + 1
            self._progress = time.monotonic()
            self._cond.notify_all()

    # -- consuming -----------------------------------------------------------------------------------------------

    def take(self, step: int, accept: Callable[[StreamGroup], bool] | None = None,
             timeout_s: float | None = None) -> StepGroups:
        """The first `prompts_per_step` complete, fresh (and accepted) groups, in submission order; blocks until
        there are that many, checking the engine every `liveness_s` and at most `stall_timeout_s` without a group
        completing (or `timeout_s` in all). Stale groups are regenerated, rejected ones replaced (module docstring)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            waiting = checked = time.monotonic()  # a stall counts while the trainer waits, not while it trains
            while True:
                if self._error is not None:
                    self.engine.check_alive()  # a dead server explains a failed request better than the request
                    raise RuntimeError(f"the rollout stream failed: {self._error}") from self._error
                self._drop_stale(step)
                chosen = self._choose(accept)
                if len(chosen) == self.P:
                    break
                now = time.monotonic()
                if deadline is not None and now > deadline:
                    raise TimeoutError(f"the rollout stream had {len(chosen)} of {self.P} groups after {timeout_s} s")
                stalled = now - max(self._progress, waiting)
                if now - checked >= self.liveness_s or stalled > self.stall_timeout_s:
                    self._cond.release()  # the check may take a while (HTTP): groups keep completing meanwhile
                    try:
                        self.engine.check_alive(stalled if stalled > self.stall_timeout_s else None)
                    finally:
                        self._cond.acquire()
                    checked = now
                self._cond.wait(1.0)
            # data order: expansion threads may finish (and get their seq) out of order
            chosen.sort(key=lambda g: g.key)
            for group in chosen:
                del self.pending[group.key]
                self.ledger.append([*group.key, step])
            metrics = self._metrics(step, chosen)
        self.last = StepGroups([g.prompt for g in chosen], [c for g in chosen for c in g.rollouts],
                               torch.cat([g.rewards for g in chosen]), torch.cat([g.valid for g in chosen]),
                               [x for g in chosen for x in g.grades], metrics)
        return self.last

    def _drop_stale(self, step: int) -> None:
        for group in self.pending.values():
            if group.done >= 0 and step - group.start_version > self.max_lag:
                self._counts["stale"] += len(group.rollouts)
                group.attempt, group.done, group.rollouts = group.attempt + 1, -1, []
                self._submit(group)

    def _choose(self, accept) -> list[StreamGroup]:
        chosen = []
        for group in sorted((g for g in self.pending.values() if g.done >= 0), key=lambda g: g.done):
            if accept is not None and not accept(group):
                del self.pending[group.key]
                self.ledger.append([*group.key, -1])  # skipped, not trained
                self._counts["skipped"] += 1
                self._release(1, max(self.released - 1, 0))  # its replacement: the next problem of the order
                continue
            chosen.append(group)
            if len(chosen) == self.P:
                break
        return chosen

    def _metrics(self, step: int, chosen: list[StreamGroup]) -> dict[str, float]:
        lags = torch.tensor([step - c.policy_version for g in chosen for c in g.rollouts], dtype=torch.float64)
        mixed = [c.end_version is not None and c.end_version != c.policy_version for g in chosen for c in g.rollouts]
        metrics = {f"rollout/policy_lag_frac_{k}": float((lags == k).double().mean()) for k in range(self.max_lag + 1)}
        metrics.update({
            "rollout/policy_lag_mean": float(lags.mean()), "rollout/mixed_version_frac": sum(mixed) / len(mixed),
            "rollout/stale_dropped": Sum(self._counts["stale"]), "rollout/skipped_groups": Sum(self._counts["skipped"]),
            "rollout/carried_groups": Sum(sum(g.done >= 0 for g in self.pending.values())),
            "rollout/inflight_groups": Sum(sum(g.done < 0 for g in self.pending.values()) + len(self.unexpanded)),
        })
        self._counts = dict.fromkeys(self._counts, 0)
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Counters, untrained prompts (as plain dicts) and the ledger: enough to resume without loss or repeat."""
        with self._cond:
            pending = sorted(self.pending.values(), key=lambda g: g.key)
            return {"released": self.released, "cursor": self.cursor, "seq": self.seq,
                    "pending": [[*g.key, g.release, g.seq, asdict(g.prompt)] for g in pending],
                    "unexpanded": [[n, release, asdict(p)] for n, (p, release) in sorted(self.unexpanded.items())],
                    "ledger": [list(e) for e in self.ledger]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` (before `start`)."""
        self.released, self.cursor, self.seq = int(state["released"]), int(state["cursor"]), int(state["seq"])
        self.pending = {}
        for n, j, release, seq, prompt in state["pending"]:
            group = StreamGroup((n, j), ProofProblem(**prompt), release, seq)
            self.pending[group.key] = group
        self.unexpanded = {n: (ProofProblem(**p), release) for n, release, p in state["unexpanded"]}
        self.ledger = [list(e) for e in state["ledger"]]
