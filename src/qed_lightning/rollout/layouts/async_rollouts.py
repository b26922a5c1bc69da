"""Generation overlapped with training (PipelineRL-style), with a bound on how off-policy a sample may be.

`AsyncRollouts` wraps any engine whose generator is separate from the trainer's policy (a `VLLMServerEngine` pool,
an `HFEngine(model=...)` copy). As soon as step k's rollouts are handed to the trainer, it starts generating step
k+1's in a background thread, with the weights the engine has then (version k), while the trainer grades, computes
the loss and steps. So step k+1 trains on samples one optimizer step old: the importance ratio rho of the loss
(sampler log-probs vs. the trainer's) corrects for it, as in the paper.

Every completion carries the policy version that generated it. When the trainer asks for step k's rollouts, prompts
whose samples are more than `max_lag` steps behind the trainer are dropped, counted (`rollout/stale_dropped`) and
generated again with the current weights. Also logged: `rollout/prefetch_hit` (1 if the step's rollouts came from
the background job) and `rollout/prefetch_wait_s` (time the trainer still waited for them).

Where we differ from PipelineRL: it swaps weights into the servers while requests are in flight (a sample may mix
two versions); we let the in-flight batch finish before pushing new weights (`load_weights` waits for it), so each
sample has exactly one version and the lag is exact. The next step's prompts come from the training loader's
`peek()` (the RL data module's seeded order knows its next batch without consuming it, so checkpoints and resume are
unaffected); at the end of a pass there is none, and the next epoch's first step generates synchronously.
The prefetched job is keyed by its prompts, sampling and group size: any other request (validation, a
reasoning-cache cycle) is served synchronously after it and leaves it in place.

Why this and the streaming layout (`layouts/streaming.py`) both exist, though both bound the lag: this one prefetches
the loader's next batch whole and grades it in the step, so a step holds exactly the batch the sequential layout
would (same prompts, same seeds; a checkpoint needs nothing beyond the loader's), and the engine is called from one
thread. The stream grades in its own threads and trains on the first complete groups, which needs a thread-safe
generator and a ledger of submitted groups in every checkpoint. A stream whose release is one batch would give this
layout's schedule but not its simplicity; this one is kept for exact comparisons with the sequential layout and for
generators that are not thread-safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from qed_lightning.metrics import Max, Sum
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig, WrappingEngine
from qed_lightning.rollout.host import PeekableLoader, check_host

log = logging.getLogger(__name__)

_Key = tuple[tuple[tuple[int, ...], ...], SamplingConfig, int]


def _key(prompts: list[list[int]], sampling: SamplingConfig, n: int) -> _Key:
    return tuple(tuple(p) for p in prompts), sampling, n


class AsyncRollouts(WrappingEngine):
    """Prefetch the next step's rollouts in a background thread; drop (and regenerate) samples older than `max_lag`.

    Args:
        engine: the generator (must not share the trainer's policy module).
        max_lag: the most optimizer steps a sample's policy may be behind the trainer (1 = the paper's one step).
        overlap: False keeps only the lag bound (no background generation).
        liveness_s: while the trainer waits for rollouts, how often it checks the engine (a dead server raises,
            naming it, instead of a wait as long as the engine's request timeout).
    """

    def __init__(self, engine: RolloutEngine, max_lag: int = 1, overlap: bool = True, liveness_s: float = 10.0) -> None:
        super().__init__(engine, max_lag)
        self.overlap, self.liveness_s = overlap, liveness_s
        self.trainer_step: int | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts")
        self._next: tuple[list[list[int]], SamplingConfig, int] | None = None
        self._pending: tuple[_Key, Future] | None = None
        self._metrics = {"rollout/stale_dropped": 0.0, "rollout/prefetch_hit": 0.0, "rollout/prefetch_wait_s": 0.0}

    # -- what the module and the callbacks call -------------------------------------------------------------------

    def attach(self, policy, tokenizer) -> None:
        if self.overlap and self.engine.shares_policy:
            raise ValueError("AsyncRollouts(overlap=True) cannot generate with the policy being trained (HFEngine "
                             "without `model`): use VLLMServerEngine, HFEngine(model=...), or set overlap: false")
        self.engine.attach(policy, tokenizer)

    def schedule_next(self, prompts: list[list[int]], sampling: SamplingConfig, n: int) -> None:
        """The next training step's request, started in the background right after the current one is served."""
        self._next = (prompts, sampling, n) if self.overlap else None

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, n: int = 1) -> list[list[Completion]]:
        key = _key(prompts, sampling, n)
        if self._pending is not None and self._pending[0] == key:
            started = time.perf_counter()
            groups = self._wait(self._pending[1])
            self._pending = None
            self._metrics["rollout/prefetch_hit"] = 1.0
            self._metrics["rollout/prefetch_wait_s"] += time.perf_counter() - started
        else:
            groups = self._wait(self._worker.submit(self.engine.generate, prompts, sampling, n))
        groups = self._drop_stale(groups, prompts, sampling, n)
        if self._next is not None and self._pending is None:
            nxt, self._next = self._next, None
            self._pending = (_key(*nxt), self._worker.submit(self.engine.generate, *nxt))
        return groups

    def _drop_stale(
        self, groups: list[list[Completion]], prompts, sampling: SamplingConfig, n: int
    ) -> list[list[Completion]]:
        """Regenerate, with the current weights, the prompts whose samples are more than `max_lag` steps old."""
        now = self.trainer_step if self.trainer_step is not None else self.engine.policy_version
        stale = [i for i, g in enumerate(groups) if g and now - min(c.policy_version for c in g) > self.max_lag]
        if not stale:
            return groups
        self._metrics["rollout/stale_dropped"] += float(sum(len(groups[i]) for i in stale))
        seeds = tuple(sampling.prompt_seed(i) for i in stale) if sampling.prompt_seed(0) is not None else None
        redo = SamplingConfig(sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_new_tokens,
                              seeds=seeds)
        fresh = self._wait(self._worker.submit(self.engine.generate, [prompts[i] for i in stale], redo, n))
        groups = list(groups)
        for i, group in zip(stale, fresh):
            groups[i] = group
        return groups

    def _wait(self, job: Future):
        """`job`'s result, checking the engine every `liveness_s` while it runs."""
        while not job.done():
            wait([job], timeout=self.liveness_s)
            if not job.done():
                self.engine.check_alive()
        return job.result()

    def _finish_pending(self) -> None:
        if self._pending is not None:  # let the in-flight batch finish on the weights it started with
            self._wait(self._pending[1])

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self._finish_pending()
        self.engine.load_weights(named_tensors)

    def push_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> dict[str, float]:
        self._finish_pending()
        return self.engine.push_weights(named_tensors, version)

    def pop_metrics(self) -> dict[str, float]:
        metrics = dict(self._metrics)
        self._metrics = dict.fromkeys(self._metrics, 0.0)
        metrics["rollout/stale_dropped"] = Sum(metrics["rollout/stale_dropped"])  # over ranks
        metrics["rollout/prefetch_wait_s"] = Max(metrics["rollout/prefetch_wait_s"])
        return metrics

    def close(self) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        self._worker.shutdown(wait=True)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts")
        self.engine.close()

    def callbacks(self) -> list[Callback]:
        return [RolloutPrefetch(self)]


def _next_batch(trainer: L.Trainer):
    """The next step's batch if the training loader can tell it without consuming it (`peek()`, as the RL data
    module's `ProblemBatches`), else None."""
    loader = trainer.train_dataloader
    return loader.peek() if isinstance(loader, PeekableLoader) else None


class RolloutPrefetch(Callback):
    """Tell `AsyncRollouts` the trainer's step and the next step's request; log its counters after each step."""

    def __init__(self, engine: AsyncRollouts) -> None:
        self.engine = engine
        self._expect_hit = False
        self._warned = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Errors at the door: the prefetch asks the module for its sampling settings and group size."""
        check_host(pl_module, "AsyncRollouts")

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.engine.trainer_step = trainer.global_step
        self._expect_hit = self.engine._pending is not None
        upcoming = _next_batch(trainer)
        if not upcoming or not all(hasattr(p, "prompt_ids") for p in upcoming):
            return
        host = check_host(pl_module, "AsyncRollouts")
        self.engine.schedule_next([p.prompt_ids for p in upcoming],
                                  host.sampling(upcoming, step=trainer.global_step + 1), host.group_size)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        metrics = self.engine.pop_metrics()
        if self._expect_hit and not metrics["rollout/prefetch_hit"] and not self._warned:
            self._warned = True
            log.warning("AsyncRollouts: the prefetched rollouts were not used (this module does not sample its batch's "
                        "policy prompts, e.g. reasoning-cache RL), so generation is not overlapped; set overlap: false")
        pl_module.log_dict(metrics, batch_size=1)
