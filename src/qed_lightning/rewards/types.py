"""What goes into a judge and what comes out (SPEC 4).

Paper's choice: a judge failure or a reply without a score becomes reward 0, indistinguishable from a real 0.
Ours: every `Grade` carries a `status`, so failures are counted apart ("error", "parse_fail", "incomplete") from real
zeros ("ok" with score 0) and from truncated rollouts that were never sent ("truncated"); `reward` is None when the
judge is configured to drop failed samples from their group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Grade", "GradeRequest", "GradeStatus"]

GradeStatus = Literal["ok", "truncated", "error", "parse_fail", "incomplete"]


@dataclass
class GradeRequest:
    """One rollout to grade.

    Args:
        problem: the problem statement.
        rubric: the marking scheme, markdown or a list of `{title, points, description}` items (rubric judge).
        response: the policy's full completion; the judge grades the text after its last `</think>`.
        reference_solution: the reference proof (IMO-ProofBench judge only).
        guidelines: the grading guidelines (IMO-ProofBench judge only).
    """

    problem: str
    rubric: str | list[dict]
    response: str
    reference_solution: str | None = None
    guidelines: str | None = None


@dataclass
class Grade:
    """The judge's verdict on one rollout.

    Args:
        score: 0..7, or None when no usable score exists (judge error or unparsable reply).
        reward: the training reward (score / 7, optionally IMO-banded); 0.0 for failures under
            `on_failure="zero"`, None under `on_failure="drop"`.
        status: "ok", "truncated" (no `</think>` or empty proof, no judge call), "error" (the judge call failed
            after its retries), "parse_fail" (the judge replied without a valid score), "incomplete" (the judge's
            reply did not finish: token limit or content filter; never scored, never cached).
        reply: the judge's raw reply text ("" when there was none; the partial text of an "incomplete" reply).
        latency_s: seconds the judge call took (0.0 for truncated rollouts and cache hits).
        cached: True when the grade came from the on-disk grade cache.
        failure: why a failed grade failed: "timeout", "http_<status>", "connection", "malformed", "incomplete"
            or "unparsable" (a reply without a valid score); "" for the other statuses.
    """

    score: int | None
    reward: float | None
    status: GradeStatus
    reply: str = ""
    latency_s: float = 0.0
    cached: bool = False
    failure: str = ""
