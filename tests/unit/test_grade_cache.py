"""The grade cache across processes that share no file lock (the ranks of a multi-node run on a shared file system).

Two processes, started together, grade overlapping proofs through `RubricJudge` and the scripted judge server, each
with its own rank; then a resumed judge grades them all again. Checked: every grade is on disk exactly once per
process that paid for it (each in its own shard: no file has two writers), nothing is lost, the merge has one grade
per proof, and the resume pays for none. The scripted server's "keyword" rule scores a proof by its number of "QED",
so each expected score is the count written into the proof.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest

from qed_lightning.rewards import GradeCache, GradeRequest, OpenAIJudgeClient, RubricJudge
from qed_lightning.rewards.cache import parse_shard
from qed_lightning.testing import ScriptedJudgeServer

pytestmark = pytest.mark.timeout(120)

RUBRIC = "## Checkpoints (7 pts total)\n- **7 pts**: the claim\n"


def request(i: int) -> GradeRequest:
    """Proof i holds i % 8 "QED"s (its score under the keyword rule) and its own number, so no two collide."""
    return GradeRequest(problem="Prove it.", rubric=RUBRIC, response=f"<think>t</think>Proof {i}. " + "QED " * (i % 8))


def _judge(cache_path: str, server: ScriptedJudgeServer) -> RubricJudge:
    client = OpenAIJudgeClient(server.url, "judge-model", timeout_s=5.0, max_retries=2, backoff_s=0.01, max_tokens=64)
    return RubricJudge(client, cache_path=cache_path, max_down_s=0.0)


def _grade_as_rank(rank: int, cache_path: str, indices: list[int], start, out) -> None:
    os.environ["RANK"] = str(rank)  # what torchrun exports; under srun SLURM_PROCID serves
    with ScriptedJudgeServer(rule="keyword", keyword="QED") as server:
        judge = _judge(cache_path, server)
        start.wait()  # both processes grade (and write) at the same time
        scores = [g.score for g in judge.grade([request(i) for i in indices])]
        judge.close()
        out.put((rank, scores, server.posts))


def test_two_processes_without_a_shared_lock_lose_and_duplicate_nothing_and_a_resume_reuses_every_grade(tmp_path):
    cache_path = str(tmp_path / "grades.sqlite")
    work = {0: list(range(0, 10)), 1: list(range(5, 15))}  # proofs 5..9 are graded by both ranks
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_grade_as_rank, args=(r, cache_path, work[r], start, out)) for r in work]
    for p in procs:
        p.start()
    results = {rank: (scores, posts) for rank, scores, posts in (out.get(timeout=90) for _ in procs)}
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for rank, indices in work.items():
        assert results[rank] == ([i % 8 for i in indices], 10)  # each paid for its own 10 proofs

    shards = {p.name: parse_shard(p.read_text()) for p in sorted(tmp_path.iterdir())}
    assert list(shards) == ["grades.rank0.jsonl", "grades.rank1.jsonl"]  # one file per writer, no lock or WAL files
    assert [len(rows) for rows in shards.values()] == [10, 10]  # every grade written, none lost
    lines = [len(p.read_text().splitlines()) for p in sorted(tmp_path.iterdir())]
    assert lines == [10, 10]  # and none written twice

    with ScriptedJudgeServer(rule="keyword", keyword="QED") as server:  # the resumed run
        judge = _judge(cache_path, server)
        grades = judge.grade([request(i) for i in range(15)])
        assert [g.score for g in grades] == [i % 8 for i in range(15)] and all(g.cached for g in grades)
        assert server.posts == 0 and judge.counters["cache_hits"] == 15
        assert len(judge.cache) == 15  # the merge keeps one grade per proof
        judge.close()


def test_a_torn_last_line_is_skipped_and_the_next_grade_starts_a_new_line(tmp_path):
    cache = GradeCache(tmp_path / "grades.sqlite", writer="rank0")
    with ScriptedJudgeServer(rule="keyword", keyword="QED") as server:
        judge = _judge(str(tmp_path / "grades.sqlite"), server)
        judge.grade([request(3)])
        judge.close()
        shard = cache.shard("rank0")
        shard.write_text(shard.read_text() + '{"key": "torn", "sco')  # the process died mid-line
        again = _judge(str(tmp_path / "grades.sqlite"), server)
        assert again.grade([request(3)])[0].cached and len(again.cache) == 1
        assert not again.grade([request(4)])[0].cached
        again.close()
    rows = [json.loads(line) for line in shard.read_text().splitlines()
            if line.startswith('{"key": "') and line.endswith("}")]
    assert [r["score"] for r in rows] == [3, 4] and len(GradeCache(tmp_path / "grades.sqlite")) == 2
