"""Reward assembly: rollouts in, judged grades and rewards out (SPEC 4 and 6).

Paper's choice (reference implementation): grade the text after the last `</think>`; a rollout without `</think>`
or with an empty proof scores 0 with no judge call; reward = score / 7; a judge failure or a reply without a score
counts as 0. IMO-ProofBench grading uses the reference solution, the guidelines and the 0/1/6/7 scale.

Ours: the same, with failures counted apart. `on_failure="zero"` (paper-exact) gives a failed grade reward 0.0;
`on_failure="drop"` gives it reward None, and the trainer leaves it out of its group's baseline. Optional IMO
banding of the reward (`banding=True`: 1..5 -> 1), an optional on-disk grade cache, and `judge/` metrics
(`pop_metrics`).

A judge that cannot keep up (8 ranks sending hundreds of long prompts to one server) fails grades rather than
stops: a run could train for hours on a reward that is mostly timeouts scored 0. So the RL step measures the share
of its judged grades that failed, over every rank (`check_failures`: logged as `judge/failure_fraction`), and past
`max_failure_fraction` the step stops before it trains, with one error naming the judge's URL and the failures by
kind (`Grade.failure`: timeout, HTTP status, connection, malformed, incomplete, unparsable). `max_concurrency` is the
job's limit of requests in flight to the judge; each rank takes `max_concurrency // world_size` of it (at least 1).

Reward integrity (the policy is trained to raise its grade, so its proof is untrusted input to the judge): a judge
reply that did not finish (token limit, content filter) is status "incomplete" (`judge/incomplete`), never a score
and never cached; the proof reaches the judge fenced by a per-call random id with its verdict tags escaped, and the
score is read only from the judge's own output (`parsing.fence_proof`, `parsing.verdict_region`; a proof carrying
verdict tags or the template's delimiters is counted in `judge/proof_markup`). The grade cache is keyed by the
unfenced proof, so the per-call id does not defeat it.

Override points (subclass `BaseJudge`): `proof_of` (what text is graded), `prompt_values` (what fills the prompt),
`parse` (how a reply becomes a score), `reward_of` (score -> reward). `RubricJudge` and `ProofBenchJudge`
(`judges.py`) differ only in these and in their default prompt.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, ClassVar, Literal, TypeVar

from qed_lightning.metrics import Max, Sum
from qed_lightning.rewards.cache import GradeCache, grade_cache_key
from qed_lightning.rewards.clients import JudgeClient, JudgeError
from qed_lightning.rewards.parsing import band_score, extract_proof, fence_proof, verdict_region
from qed_lightning.rewards.templates import load_prompt
from qed_lightning.rewards.types import Grade, GradeRequest

__all__ = ["BaseJudge", "JudgeDownError", "JudgeFailuresError"]

log = logging.getLogger(__name__)
T = TypeVar("T")
STATUSES = ("ok", "truncated", "error", "parse_fail", "incomplete")
FAILED = ("error", "parse_fail", "incomplete")


class JudgeDownError(RuntimeError):
    """The judge did not answer for longer than `max_down_s`: the run stops rather than train on zeros."""


class JudgeFailuresError(RuntimeError):
    """More of a step's grades failed than `max_failure_fraction` allows: the run stops rather than train on them."""


class _LoopThread:
    """One long-lived event loop in a daemon thread, so sync callers share connections across batches."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="qed-judge-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("BaseJudge.grade was called from the judge's own event loop; await agrade instead.")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=10)
            self.loop.close()


class BaseJudge:
    """Grades rollouts with an LLM judge; see the module docstring. Subclasses set the prompt and the parser.

    Args:
        client: the judge backend (`OpenAIJudgeClient`, `EngineJudgeClient`, or `ScriptedJudgeClient` in demos).
        prompt: a packaged template name or a template file.
        require_think_close: grade only rollouts that closed their thinking (paper); False grades the whole
            response when there is no `</think>`.
        on_failure: reward of a failed grade: "zero" (paper) or "drop" (None; excluded from its group).
        banding: map scores to the IMO scale (1..5 -> 1) before dividing by 7.
        cache_path: name of the grade cache (None = no cache); each rank writes `<stem>.rank<R>.jsonl` next to it
            and every rank reads all of them when it starts (`rewards/cache.py`).
        max_down_s: circuit breaker: when every call of a batch fails, pause and probe the judge for up to this
            many seconds, then stop the run with `JudgeDownError` (0 = never pause: failures follow on_failure).
        probe_interval_s: seconds between probes while the judge is down.
        placeholders: aliases for a template file written with other placeholder names, `{their_name: our_field}`
            (fields: problem, rubric, proof, reference_solution, guidelines), so the file is used unchanged.
        verdict: which score tag of the reply counts when there are several: "last" (ours) or "first" (reference).
        max_failure_fraction: the share of an RL step's judged grades (all ranks) that may fail (timeout, HTTP
            error, unparsable or unfinished reply) before the run stops with the judge's URL and the failures by kind,
            rather than train on them (`on_failure`); logged as `judge/failure_fraction`. 1 = never stop.
        max_concurrency: judge requests in flight for the whole job; each rank allows `max_concurrency //
            world_size` (at least 1), replacing its client's own `max_concurrency`. None = the client's, per rank.
    """

    request_fields: ClassVar[tuple[str, ...]] = ("problem",)
    prompt_fields: ClassVar[frozenset[str]] = frozenset({"proof"})
    #: called with each grade as it finishes (the RL module sets it around its `grade` call; None = nobody listens)
    progress: Callable[[Grade], None] | None = None

    def __init__(
        self,
        client: JudgeClient,
        prompt: str,
        require_think_close: bool = True,
        on_failure: Literal["zero", "drop"] = "zero",
        banding: bool = False,
        cache_path: str | None = None,
        max_down_s: float = 1800.0,
        probe_interval_s: float = 30.0,
        placeholders: dict[str, str] | None = None,
        verdict: Literal["last", "first"] = "last",
        max_failure_fraction: float = 0.5,
        max_concurrency: int | None = None,
    ):
        if on_failure not in ("zero", "drop"):
            raise ValueError(f"on_failure must be 'zero' (paper: a failure scores 0) or 'drop', got {on_failure!r}.")
        if not 0.0 <= max_failure_fraction <= 1.0:
            raise ValueError(
                f"judge max_failure_fraction must be in [0, 1] (1 = never stop), got {max_failure_fraction}")
        if max_concurrency is not None and (max_concurrency < 1 or not hasattr(client, "max_concurrency")):
            raise ValueError(f"judge max_concurrency={max_concurrency}: it must be >= 1, and the client "
                             f"({type(client).__name__}) must have a max_concurrency to set (OpenAIJudgeClient has)")
        self.max_failure_fraction, self.max_concurrency = max_failure_fraction, max_concurrency
        self.client = client
        self.prompt = load_prompt(prompt, placeholders)
        if verdict == "first":  # the same reply reads to another score: grades made so never share a cache key
            self.prompt = replace(self.prompt, version=f"{self.prompt.version}+first")
        self.verdict = verdict
        self.prompt.require(set(self.prompt_fields))
        self.require_think_close, self.on_failure, self.banding = require_think_close, on_failure, banding
        # a command-line `...cache_path null` on a nested component reaches us as the string "None" (jsonargparse)
        self.cache = GradeCache(cache_path) if cache_path not in (None, "", "None", "null") else None
        self.max_down_s, self.probe_interval_s = max_down_s, probe_interval_s
        self.counters: Counter[str] = Counter()
        self.latencies: list[float] = []
        self._stats_lock = threading.Lock()
        self._runner: _LoopThread | None = None
        self._last_error = ""
        log.info("%s: judge %s, prompt %s", type(self).__name__, client.model_name, self.prompt.version)

    # ---- override points ------------------------------------------------------------------------------------
    def proof_of(self, response: str) -> str | None:
        """The text to grade: after the last `</think>` (None = truncated, unless `require_think_close` is off)."""
        proof = extract_proof(response)
        if proof is None and not self.require_think_close:
            proof = response.strip()
        return proof

    def prompt_values(self, request: GradeRequest, proof: str) -> dict[str, str]:
        """The values substituted into the prompt's placeholders; they also key the grade cache."""
        raise NotImplementedError

    def parse(self, reply: str) -> int | None:
        """The 0..7 score in the judge's reply (its verdict region: `parsing.verdict_region`), or None."""
        raise NotImplementedError

    def reward_of(self, score: int) -> float:
        return (band_score(score) if self.banding else score) / 7

    # ---- grading --------------------------------------------------------------------------------------------
    def grade(self, requests: list[GradeRequest]) -> list[Grade]:
        """Grade all requests concurrently; callable from any thread (it runs on the judge's own event loop)."""
        with self._stats_lock:
            if self._runner is None:
                if self.max_concurrency is not None:  # the job's limit, shared by the ranks (before any connection)
                    from qed_lightning.parallel.distributed import world_size  # torch: only when asked for

                    self.client.max_concurrency = max(1, self.max_concurrency // world_size())
                self._runner = _LoopThread()
                weakref.finalize(self, self._runner.close)  # an unclosed judge does not leave its thread behind
            runner = self._runner
        return runner.run(self.agrade(requests))

    async def agrade(self, requests: list[GradeRequest]) -> list[Grade]:
        """`grade` for async callers."""
        self._check_requests(requests)
        grades = list(await asyncio.gather(*(self._grade_reported(r) for r in requests)))
        grades = await self._ride_out_outage(requests, grades)
        self._record(grades)
        return grades

    async def _grade_reported(self, request: GradeRequest) -> Grade:
        grade = await self._grade_one(request)
        if self.progress is not None:  # a progress display follows the batch (called on the judge's own thread)
            self.progress(grade)
        return grade

    # ---- circuit breaker ------------------------------------------------------------------------------------
    async def _ride_out_outage(self, requests: list[GradeRequest], grades: list[Grade]) -> list[Grade]:
        """When *every* judge call of a batch failed to get an answer (status "error"), the judge is down rather
        than flaky: instead of training on a batch of zeros, pause, probe every `probe_interval_s`, and regrade the
        failed requests once it answers again. Down for longer than `max_down_s` (0 = never pause): raise
        `JudgeDownError`, which stops the run with a clear message (resume from the last checkpoint)."""
        failed = [i for i, g in enumerate(grades) if g.status == "error"]
        called = [g for g in grades if g.status != "truncated" and not g.cached]
        if self.max_down_s <= 0 or not failed or len(failed) < len(called):
            return grades
        started = time.monotonic()
        self.counters["outages"] += 1
        while failed:
            down = time.monotonic() - started
            if down >= self.max_down_s:
                raise JudgeDownError(f"the judge ({self.client.model_name}) has not answered for {down:.0f} s "
                                     f"(max_down_s={self.max_down_s}); last error: {self._last_error}. Check the "
                                     "judge server, then resume the run from its last checkpoint (--ckpt_path last).")
            log.error("judge DOWN for %.0f s (%d requests unanswered): the run is paused; probing again in %.0f s, "
                      "giving up after max_down_s=%.0f s. Last error: %s", down, len(failed),
                      self.probe_interval_s, self.max_down_s, self._last_error)
            await asyncio.sleep(self.probe_interval_s)
            retried = await asyncio.gather(*(self._grade_one(requests[i]) for i in failed))
            for i, grade in zip(failed, retried):
                grades[i] = grade
            failed = [i for i in failed if grades[i].status == "error"]
            if len(failed) < len(retried):
                break  # the judge answers again; the remaining failures are ordinary ones
        self.counters["down_s"] += time.monotonic() - started
        log.warning("judge answers again after %.0f s", time.monotonic() - started)
        return grades

    def _check_requests(self, requests: list[GradeRequest]) -> None:
        problems = [
            f"request {i} has no {field}"
            for i, request in enumerate(requests)
            for field in self.request_fields
            if getattr(request, field) is None
        ]
        if problems:
            needs, found = ", ".join(self.request_fields), "; ".join(problems[:5])
            raise ValueError(f"{type(self).__name__} needs {needs} on every GradeRequest: {found}.")

    async def _grade_one(self, request: GradeRequest) -> Grade:
        proof = self.proof_of(request.response)
        if not proof:
            return Grade(score=0, reward=0.0, status="truncated")
        values = self.prompt_values(request, proof)
        key = grade_cache_key(self.client.model_name, self.prompt.version, values) if self.cache is not None else None
        if key is not None and (hit := self.cache.get(key)) is not None:
            hit.reward = self.reward_of(hit.score)
            return hit
        grade = await self._ask_judge(values)
        if key is not None:
            self.cache.put(key, grade)
        return grade

    async def _ask_judge(self, values: dict[str, str]) -> Grade:
        fenced = fence_proof(values["proof"], self.prompt.delimiters)
        if fenced.markup:
            with self._stats_lock:
                self.counters["proof_markup"] += 1
        start = time.perf_counter()
        try:
            reply = await self.client.complete(self.prompt.render(**{**values, "proof": fenced.text}))
        except JudgeError as err:
            self._last_error = str(err)
            log.debug("judge call failed: %s", err)
            status = "incomplete" if err.kind == "incomplete" else "error"
            return self._failure(status, err.reply, time.perf_counter() - start, err.failure)
        latency = time.perf_counter() - start
        score = self.parse(verdict_region(reply, fenced))
        if score is None:
            self._last_error = f"parse_fail: no valid score in reply {reply[-200:]!r}"
            return self._failure("parse_fail", reply, latency, "unparsable")
        return Grade(score=score, reward=self.reward_of(score), status="ok", reply=reply, latency_s=latency)

    def _failure(self, status: Literal["error", "parse_fail", "incomplete"], reply: str, latency: float,
                 failure: str) -> Grade:
        reward = 0.0 if self.on_failure == "zero" else None
        return Grade(score=None, reward=reward, status=status, reply=reply, latency_s=latency, failure=failure)

    def check_failures(self, grades: list[Grade], step: int) -> float:
        """The share of a step's judged grades (ok or failed; truncated rollouts are not judged) that failed, over
        every rank (a gather: every rank calls it at the same point and gets the same answer). Past
        `max_failure_fraction`, raise `JudgeFailuresError` (on every rank) naming the judge and the failures by kind."""
        from qed_lightning.parallel.distributed import gather_objects, world_size  # torch: only when asked for

        failures = Counter(g.failure or g.status for g in grades if g.status in FAILED)
        judged = sum(g.status == "ok" or g.status in FAILED for g in grades)
        if world_size() > 1:
            per_rank = gather_objects((judged, failures))
            judged, failures = sum(n for n, _ in per_rank), sum((c for _, c in per_rank), Counter())
        failed = sum(failures.values())
        fraction = failed / judged if judged else 0.0
        if fraction > self.max_failure_fraction:
            where = getattr(self.client, "base_url", None) or self.client.model_name
            kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(failures.items()))
            raise JudgeFailuresError(
                f"step {step}: {failed} of {judged} judge grades failed ({fraction:.0%} > "
                f"model.judge.init_args.max_failure_fraction={self.max_failure_fraction}) at the judge {where} "
                f"({self.client.model_name}): {kinds}; last error: {self._last_error}. The judge cannot keep up or "
                "is misconfigured: check its server, lower model.judge.init_args.max_concurrency (the job's "
                "requests in flight), raise the client's timeout_s, or raise max_failure_fraction (1 = never stop).")
        return fraction

    # ---- metrics --------------------------------------------------------------------------------------------
    def _record(self, grades: list[Grade]) -> None:
        called = [g for g in grades if g.status != "truncated" and not g.cached]
        with self._stats_lock:
            self.counters.update(g.status for g in grades)
            self.counters["cache_hits"] += sum(g.cached for g in grades)
            self.counters["calls"] += len(called)
            self.latencies.extend(g.latency_s for g in called)
        failed = sum(g.status in FAILED for g in grades)
        if failed:
            log.warning("judge: %d of %d grades failed (on_failure=%s); last: %s",
                        failed, len(grades), self.on_failure, self._last_error)

    def pop_metrics(self) -> dict[str, float]:
        """`judge/*` counts (summed over ranks) and latencies since the last pop; resets `counters` and `latencies`."""
        with self._stats_lock:
            counts, latencies = self.counters.copy(), list(self.latencies)
            self.counters.clear()
            self.latencies.clear()
        names = (*STATUSES, "cache_hits", "calls", "outages", "down_s", "proof_markup")
        metrics = {f"judge/{name}": Sum(counts[name]) for name in names}
        metrics["judge/down_s"] = Max(counts["down_s"])
        metrics["judge/latency_mean_s"] = sum(latencies) / len(latencies) if latencies else 0.0
        metrics["judge/latency_max_s"] = Max(max(latencies, default=0.0))
        return metrics

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close connections, the judge's event loop and the cache."""
        if self._runner is not None:
            self._runner.run(self.client.aclose())
            self._runner.close()
            self._runner = None
        if self.cache is not None:
            self.cache.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_runner=None, _stats_lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stats_lock = threading.Lock()
