"""A discrete-event simulator of RL training layouts: where the devices of a step go, before renting them.

Given measured component throughputs and a completion-length distribution, `simulate` plays `steps` RL steps of one
layout and reports steps/hour, the idle share of generating and training devices, and the policy lag of the trained
samples. It answers "colocated 8, or 8 + 8, or the paper's 24 + 8, and with which `max_lag`?" from numbers a user
can measure on one device (`scripts/bench_rl.py` prints them for a CPU run; `scripts/simulate_layout.py` is the CLI).

The model (every choice here is a simplification, named so it can be checked against a real run):
- Generation is continuous batching on a pool of `gen_devices`: the running sequences share the pool's decode
  throughput equally (processor sharing), `gen_devices * gen_tokens_per_s` tokens/s in all, but one sequence never
  decodes faster than `seq_tokens_per_s` (decoding is latency-bound at small batch) and at most
  `gen_devices * max_seqs_per_device` run at once (the KV cache), the rest wait. This is what makes the long tail of
  long proofs expensive: when a few long sequences are left, the pool runs far below its throughput. Prefill is
  charged as `prompt_len / prefill_tokens_per_s` of delay before a sequence's first token.
- Grading is streamed: each finished rollout goes to the judge, which answers `judge_concurrency` calls at a time,
  each taking `judge_latency_s`; a group is ready when its G rollouts are graded.
- Training a step costs `tokens / (train_devices * train_tokens_per_s)` (prompt + completion tokens of its
  sequences), then `push_s` to push the new weights to the generators (the trainer waits for the push).
- **Colocated** (`colocated=True`): the same devices generate, then train, then push, one step after another (our
  default layout, and verl's / TRL's). Idle share counts decode capacity left unused during generation and the
  generation time during which nothing trains.
- **Disaggregated** (PipelineRL, the paper): generators run all the time. The groups of step s may start as soon as
  the generators hold weights of version >= s - max_lag (version v = after v optimizer steps), so with max_lag 0 the
  generators wait for every step, with max_lag 1 they generate step k+1 while the trainer trains on step k. The
  trainer takes, in completion order, the first `prompts_per_step` ready groups (streaming: a step never waits for
  the slowest group of "its" batch while others are ready); a group whose version is more than `max_lag` behind the
  trainer is dropped, counted and regenerated. A sample's policy version is the version its generation started on.
"""

from __future__ import annotations

import heapq
import random
import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Throughputs:
    """Per-device component speeds (measure them; `scripts/bench_rl.py` prints them for a CPU run).

    Args:
        gen_tokens_per_s: decode tokens/s of one generating device with a full batch.
        seq_tokens_per_s: decode tokens/s of a single sequence (latency bound); inf = no bound.
        train_tokens_per_s: trained tokens/s (prompt + completion, forward + backward + step) of one training device.
        judge_latency_s: seconds per judge call. judge_concurrency: calls the judge answers at once.
        push_s: seconds to push new weights to the generators after a step.
        prefill_tokens_per_s: prompt tokens/s of one sequence's prefill (inf = free).
        max_seqs_per_device: concurrent sequences one generating device holds (KV-cache bound).
    """

    gen_tokens_per_s: float
    train_tokens_per_s: float
    seq_tokens_per_s: float = float("inf")
    judge_latency_s: float = 0.0
    judge_concurrency: int = 1_000_000
    push_s: float = 0.0
    prefill_tokens_per_s: float = float("inf")
    max_seqs_per_device: int = 1_000_000


@dataclass(frozen=True)
class Layout:
    """Devices and staleness: `gen_devices` generate, `train_devices` train; colocated = the same devices take turns."""

    name: str
    gen_devices: int
    train_devices: int
    colocated: bool = False
    max_lag: int = 1


@dataclass(frozen=True)
class Workload:
    """One RL step: `prompts_per_step` groups of `group_size` rollouts; completion lengths drawn from `lengths`."""

    prompts_per_step: int
    group_size: int
    lengths: tuple[int, ...]
    prompt_len: float = 0
    steps: int = 8
    seed: int = 0


@dataclass
class Result:
    """What a simulated run gives: step times (s), idle shares in [0, 1], and the policy lag of every trained sample."""

    layout: str
    step_s: list[float]
    gen_idle: float
    train_idle: float
    lags: list[int] = field(default_factory=list)
    stale_dropped: int = 0

    @property
    def mean_step_s(self) -> float:
        """Steady-state step time: the mean over steps after the first (the first fills the pipeline)."""
        tail = self.step_s[1:] or self.step_s
        return statistics.fmean(tail)

    @property
    def steps_per_hour(self) -> float:
        return 3600.0 / self.mean_step_s

    def lag_histogram(self) -> dict[int, float]:
        """Share of trained samples per policy lag."""
        n = max(len(self.lags), 1)
        return {lag: self.lags.count(lag) / n for lag in sorted(set(self.lags))}


class _Pool:
    """Processor-sharing decode pool: running sequences advance at the same rate, `min(seq cap, capacity / n)`.

    Progress is tracked as a shared "virtual clock" (tokens decoded by every running sequence since the pool
    started), so a sequence finishes when the clock reaches its start value plus its length: a heap gives the next
    finish in O(log n) instead of updating every sequence at every event.
    """

    def __init__(self, devices: int, tp: Throughputs) -> None:
        self.capacity = devices * tp.gen_tokens_per_s
        self.seq_cap = tp.seq_tokens_per_s
        self.slots = devices * tp.max_seqs_per_device
        self.clock = 0.0  # virtual tokens
        self.running: list[tuple[float, int, object]] = []  # (finish clock, tiebreak, payload)
        self.waiting: list[tuple[int, object]] = []
        self.used = 0.0  # token-seconds of decode actually done (tokens)
        self._n = 0

    def rate(self) -> float:
        n = len(self.running)
        return min(self.seq_cap, self.capacity / n) if n else 0.0

    def add(self, length: int, payload) -> None:
        self.waiting.append((max(length, 1), payload))
        self._admit()

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.slots:
            length, payload = self.waiting.pop(0)
            self._n += 1
            heapq.heappush(self.running, (self.clock + length, self._n, payload))

    def next_finish_in(self) -> float:
        """Seconds until the next sequence finishes at the current rate (inf when idle)."""
        if not self.running:
            return float("inf")
        return (self.running[0][0] - self.clock) / self.rate()

    def advance(self, seconds: float) -> None:
        rate = self.rate()
        self.clock += rate * seconds
        self.used += rate * len(self.running) * seconds

    def pop_finished(self) -> list[object]:
        done = []
        while self.running and self.running[0][0] <= self.clock + 1e-9:
            done.append(heapq.heappop(self.running)[2])
        self._admit()
        return done


class _Judge:
    """`concurrency` servers answering calls of `latency` seconds in arrival order; returns each call's answer time."""

    def __init__(self, tp: Throughputs) -> None:
        self.latency = tp.judge_latency_s
        self.free = [0.0] * min(tp.judge_concurrency, 1 << 16)

    def submit(self, now: float) -> float:
        start = max(now, heapq.heappop(self.free))
        heapq.heappush(self.free, start + self.latency)
        return start + self.latency


def _draw_lengths(work: Workload, rng: random.Random, groups: int) -> list[list[int]]:
    return [[rng.choice(work.lengths) for _ in range(work.group_size)] for _ in range(groups)]


def _work(n: int, work: Workload, tp: Throughputs) -> float:
    """Decode-equivalent tokens of one sequence: its completion plus its prefill at the prefill/decode speed ratio."""
    return n + work.prompt_len * tp.gen_tokens_per_s / tp.prefill_tokens_per_s


def _train_s(work: Workload, groups: list[list[int]], layout: Layout, tp: Throughputs) -> float:
    tokens = sum(work.prompt_len + n for g in groups for n in g)
    return tokens / (layout.train_devices * tp.train_tokens_per_s)


def simulate(layout: Layout, tp: Throughputs, work: Workload) -> Result:
    """Play `work.steps` RL steps of `layout` and return its step times, idle shares and sample lags."""
    problems = []
    if layout.gen_devices < 1 or layout.train_devices < 1:
        problems.append(f"layout {layout.name!r} needs >= 1 generating and >= 1 training device")
    if layout.max_lag < 0:
        problems.append(f"max_lag must be >= 0, got {layout.max_lag}")
    if not work.lengths or min(work.lengths) < 1:
        problems.append("workload lengths must be a non-empty list of positive token counts")
    if work.steps < 1 or work.prompts_per_step < 1 or work.group_size < 1:
        problems.append("workload steps, prompts_per_step and group_size must be >= 1")
    if problems:
        raise ValueError("; ".join(problems))
    if layout.colocated:
        return _colocated(layout, tp, work)
    return _Pipeline(layout, tp, work).run()


def _colocated(layout: Layout, tp: Throughputs, work: Workload) -> Result:
    """Generate (grading streamed), then train, then push: one step after another on the same devices."""
    rng = random.Random(work.seed)
    now, step_s, busy = 0.0, [], 0.0
    for _ in range(work.steps):
        start = now
        groups = _draw_lengths(work, rng, work.prompts_per_step)
        pool, judge = _Pool(layout.gen_devices, tp), _Judge(tp)
        for lengths in groups:
            for n in lengths:
                pool.add(_work(n, work, tp), None)
        graded = now
        while pool.running:
            dt = pool.next_finish_in()
            pool.advance(dt)
            now += dt
            for _ in pool.pop_finished():
                graded = max(graded, judge.submit(now))
        train = _train_s(work, groups, layout, tp)
        busy += pool.used / pool.capacity + train  # seconds of full use of the devices
        now = max(now, graded) + train + tp.push_s
        step_s.append(now - start)
    idle = 1.0 - busy / now
    lags = [0] * (work.steps * work.prompts_per_step * work.group_size)
    return Result(layout.name, step_s, gen_idle=idle, train_idle=idle, lags=lags)


@dataclass
class _Group:
    version: int
    lengths: list[int]
    left: int = 0
    ready_at: float = 0.0


class _Pipeline:
    """The disaggregated layout as an event loop over the decode pool, the judge and the trainer."""

    def __init__(self, layout: Layout, tp: Throughputs, work: Workload) -> None:
        self.layout, self.tp, self.work = layout, tp, work
        self.rng = random.Random(work.seed)
        self.pool, self.judge = _Pool(layout.gen_devices, tp), _Judge(tp)
        self.now, self.trainer_free = 0.0, 0.0
        self.gen_version, self.released, self.counter, self.stale = 0, 0, 0, 0
        self.ready: list[tuple[float, int, _Group]] = []  # (graded time, tiebreak, group)
        self.weights: list[tuple[float, int]] = []  # (arrival at the generators, version)

    def release(self) -> None:
        """Start every step's groups that the generators' weights allow (version >= step - max_lag)."""
        last = min(self.gen_version + self.layout.max_lag, self.work.steps + self.layout.max_lag)
        while self.released <= last:
            for lengths in _draw_lengths(self.work, self.rng, self.work.prompts_per_step):
                self.start_group(lengths)
            self.released += 1

    def start_group(self, lengths: list[int]) -> None:
        group = _Group(self.gen_version, lengths, left=len(lengths))
        for n in lengths:
            self.pool.add(_work(n, self.work, self.tp), group)

    def advance_to_next_event(self) -> None:
        times = [self.now + self.pool.next_finish_in(), *(t for t, _ in self.weights[:1]),
                 *(r[0] for r in self.ready if r[0] > self.now)]
        if self.trainer_free > self.now:
            times.append(self.trainer_free)
        t = min(times)
        if t == float("inf"):
            raise RuntimeError("simulation stalled: no generation, judge answer or weight update pending")
        self.pool.advance(t - self.now)
        self.now = t
        for group in self.pool.pop_finished():
            group.left -= 1
            group.ready_at = max(group.ready_at, self.judge.submit(self.now))
            if group.left == 0:
                self.counter += 1
                heapq.heappush(self.ready, (group.ready_at, self.counter, group))
        while self.weights and self.weights[0][0] <= self.now + 1e-12:
            self.gen_version = self.weights.pop(0)[1]
            self.release()

    def take(self, step: int) -> list[_Group]:
        """The first `prompts_per_step` groups graded by now; older than `max_lag`: dropped and regenerated."""
        P = self.work.prompts_per_step
        while True:
            while self.trainer_free > self.now + 1e-12 or sum(r[0] <= self.now for r in self.ready) < P:
                self.advance_to_next_event()
            for entry in [r for r in self.ready if r[0] <= self.now and step - r[2].version > self.layout.max_lag]:
                self.ready.remove(entry)
                self.stale += 1
                self.start_group(entry[2].lengths)
            heapq.heapify(self.ready)
            if sum(r[0] <= self.now for r in self.ready) >= P:
                return [heapq.heappop(self.ready)[2] for _ in range(P)]

    def run(self) -> Result:
        self.release()
        ends, lags, train_busy = [0.0], [], 0.0
        for k in range(self.work.steps):
            taken = self.take(k)
            lags.extend(k - g.version for g in taken for _ in g.lengths)
            train = _train_s(self.work, [g.lengths for g in taken], self.layout, self.tp)
            train_busy += train
            self.trainer_free = self.now + train + self.tp.push_s
            self.weights.append((self.trainer_free, k + 1))
            ends.append(self.trainer_free)
        wall = ends[-1]
        return Result(self.layout.name, [b - a for a, b in zip(ends, ends[1:])],
                      gen_idle=1.0 - self.pool.used / (self.pool.capacity * wall),
                      train_idle=1.0 - train_busy / wall, lags=lags, stale_dropped=self.stale)
