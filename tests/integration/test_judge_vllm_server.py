"""The judge client against a REAL vLLM OpenAI-compatible server running the tiny model (CPU build of vLLM).

The tiny random model cannot grade, so its replies carry no score: what this proves is the protocol round trip on
both APIs (request bodies vLLM accepts, reply bodies the client reads), ending in "parse_fail" with the reply
recorded, or, when the reply ran into `max_tokens`, in "incomplete" (the server's own `finish_reason: length` /
`status: incomplete`, read by the client: never a score), never in "error".
"""

from __future__ import annotations

import httpx
import pytest

from qed_lightning.rewards import GradeRequest, OpenAIJudgeClient, RubricJudge
from vllm_server import SHARED_NAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Short texts: the judge prompt must stay well inside the tiny model's 2,048-token context (~2 chars per token).
PROBLEM = "Prove that $n^2 + n$ is even for every integer $n$."
RUBRIC = ("## Checkpoints (7 pts total)\n- **3 pts**: writes $n^2+n = n(n+1)$\n"
          "- **4 pts**: one of two consecutive integers is even")
PROOF = "<think>factor it</think>Since $n^2+n = n(n+1)$ and one of $n, n+1$ is even, the product is even."


@pytest.fixture
def vllm_server(shared_vllm_server):
    """The suite's shared `vllm serve` of the tiny model (conftest, `vllm_server.SharedServer`), served as
    SHARED_NAME; what it was last reloaded with does not matter here (the tiny model cannot grade either way)."""
    return f"{shared_vllm_server}/v1"


def test_models_endpoint_lists_the_served_model(vllm_server):
    models = httpx.get(f"{vllm_server}/models", timeout=10.0).json()
    assert [m["id"] for m in models["data"]] == [SHARED_NAME]


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_rubric_judge_round_trip_on_a_real_server(vllm_server, api):
    client = OpenAIJudgeClient(vllm_server, SHARED_NAME, api=api, api_key_env=None, max_tokens=32, timeout_s=120.0,
                               max_retries=1)
    judge = RubricJudge(client)
    requests = [GradeRequest(PROBLEM, RUBRIC, PROOF), GradeRequest(PROBLEM, RUBRIC, PROOF + " Hence done."),
                GradeRequest(PROBLEM, RUBRIC, "<think>ran out of tokens")]
    try:
        grades = judge.grade(requests)
    finally:
        judge.close()
    graded, truncated = grades[:2], grades[2]
    # A random tiny model writes no valid <score> tag: the round trip worked, nothing errored. A reply that ended
    # (EOS) is a parse failure with its text recorded; one cut at max_tokens=32 is incomplete and scores nothing.
    statuses = [g.status for g in graded]
    assert set(statuses) <= {"parse_fail", "incomplete"}, [g.reply for g in graded]
    assert all(g.score is None and g.reward == 0.0 and g.latency_s > 0 for g in graded)
    assert all(g.reply.strip() for g in graded if g.status == "parse_fail")
    assert truncated.status == "truncated"
    counts = {k: v for k, v in judge.counters.items() if v}
    assert counts == {**{s: statuses.count(s) for s in set(statuses)}, "truncated": 1, "calls": 2}
