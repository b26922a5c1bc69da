"""Resumability: the JSONL bookkeeping, the plan of what is left, the manifest, and an interrupted `Evaluator` that
picks up where it stopped without regenerating or regrading (scripted engine and judge, no model)."""

from __future__ import annotations

import itertools
import json

import pytest
from fakes import FakeEngine, FakeJudgeClient, FakeTokenizer, proof_in

from qed_lightning.eval import Evaluator, IMOProofBench
from qed_lightning.eval.store import JsonlLog, SampleStore, check_manifest
from qed_lightning.rewards import ProofBenchJudge


def test_jsonl_log_cuts_a_torn_last_line_and_refuses_a_bad_middle_line(tmp_path):
    log = JsonlLog(tmp_path / "s.jsonl")
    log.append([{"a": 1}, {"a": 2}])
    with open(log.path, "a") as fh:
        fh.write('{"a": 3, "b": "interrupt')  # a crash in the middle of a write
    assert log.read() == [{"a": 1}, {"a": 2}]
    log.append([{"a": 4}])
    assert log.read() == [{"a": 1}, {"a": 2}, {"a": 4}]
    log.path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        log.read()


def _record(pid, sample, status=None, judge="J"):
    record = {"problem_id": pid, "sample": sample, "scaffold": "direct", "output": f"{pid}/{sample}"}
    return record if status is None else {**record, "status": status, "judge": judge}


def test_plan_skips_graded_keys_and_grades_stored_generations(tmp_path):
    store = SampleStore(tmp_path)
    store.generations.append([_record(p, k) for p in ("a", "b", "c", "d") for k in (0,)])
    store.samples.append([_record("a", 0, "ok"), _record("b", 0, "error"), _record("c", 0, "ok", judge="other judge")])
    wanted = [(p, 0, "direct") for p in ("a", "b", "c", "d", "e")]
    to_generate, to_grade = store.plan(wanted, "J")
    # a: done. b: its grade failed -> regrade. c: graded by another judge -> regrade. d: generated only. e: new.
    assert to_generate == [("e", 0, "direct")]
    assert [r["problem_id"] for r in to_grade] == ["b", "c", "d"]
    assert [r["problem_id"] for r in store.plan(wanted, "J", regrade_failures=False)[1]] == ["c", "d"]
    store.samples.append([_record("b", 0, "ok")])  # the latest record of a key wins
    assert [r["problem_id"] for r in store.plan(wanted, "J")[1]] == ["c", "d"]


def test_manifest_refuses_to_resume_with_other_settings(tmp_path):
    check_manifest(tmp_path, "direct", {"model": "m1", "sampling": {"temperature": 0.8}})
    check_manifest(tmp_path, "direct", {"model": "m1", "sampling": {"temperature": 0.8}})  # same settings: fine
    check_manifest(tmp_path, "gvr", {"model": "m2"})  # another scaffold name has its own entry
    with pytest.raises(ValueError, match=r"changed: model.*new folder"):
        check_manifest(tmp_path, "direct", {"model": "m2", "sampling": {"temperature": 0.8}})


class Interrupt(Exception):
    pass


def _evaluator(tmp_path, samples_dir, engine, judge, tokenizer) -> Evaluator:
    evaluator = Evaluator(model="fake", benchmark=IMOProofBench(str(samples_dir / "imo_proofbench.jsonl"), limit=3),
                          judge=judge, engine=engine, n=2, max_new_tokens=16, output_dir=str(tmp_path), batch_size=2,
                          plot=False)
    evaluator.tokenizer = tokenizer  # no model: the scripted engine needs no start
    return evaluator


def test_an_interrupted_evaluation_resumes_without_regenerating_or_regrading(tmp_path, samples_dir, capsys):
    tok = FakeTokenizer()
    serial = itertools.count()  # every generation differs, so every grade is a judge call
    engine = FakeEngine(tok, lambda text: (f"<think>t</think>{text[-12:]} proof #{next(serial)}", 7, "stop"))
    client = FakeJudgeClient(lambda prompt: f"<points>{len(proof_in(prompt)) % 8} out of 7</points>")
    judge = ProofBenchJudge(client)
    real_grade = judge.grade
    chunks = []

    def grade_then_crash(requests):  # chunk 1 is graded; chunk 2 is generated, then the process "dies"
        chunks.append(len(requests))
        if len(chunks) == 2:
            raise Interrupt
        return real_grade(requests)

    judge.grade = grade_then_crash
    with pytest.raises(Interrupt):
        _evaluator(tmp_path, samples_dir, engine, judge, tok).run()
    assert sum(len(c) for c in engine.calls) == 4 and len(client.prompts) == 2
    assert len(SampleStore(tmp_path).graded()) == 2 and len(SampleStore(tmp_path).generated()) == 4

    judge.grade = real_grade
    summary = _evaluator(tmp_path, samples_dir, engine, judge, tok).run()
    # 6 samples wanted: 2 graded before, 2 generated-not-graded are graded now, 2 are generated now
    assert sum(len(c) for c in engine.calls) == 4 + 2 and len(client.prompts) == 2 + 4
    assert summary["this_run"]["generated"] == 2 and summary["this_run"]["graded"] == 4
    first = (tmp_path / "samples.jsonl").read_text()

    summary = _evaluator(tmp_path, samples_dir, engine, judge, tok).run()
    assert sum(len(c) for c in engine.calls) == 6 and len(client.prompts) == 6  # nothing new at all
    assert summary["this_run"]["generated"] == 0 and summary["this_run"]["judge/calls"] == 0
    assert (tmp_path / "samples.jsonl").read_text() == first
    rows = [json.loads(line) for line in first.splitlines()]
    assert sorted((r["problem_id"], r["sample"]) for r in rows) == [
        (p, k) for p in ("PB-Basic-001", "PB-Basic-002", "PB-Basic-003") for k in (0, 1)]
    assert summary["scaffolds"]["direct"]["overall"]["n"] == 6
    assert "direct" in capsys.readouterr().out  # the rich table


def test_a_lost_sample_line_is_regraded_from_the_grade_cache(tmp_path, samples_dir):
    tok = FakeTokenizer()
    engine = FakeEngine(tok, lambda text: ("<think>t</think>proof", 3, "stop"))
    client = FakeJudgeClient(lambda prompt: "<points>6 out of 7</points>")
    _evaluator(tmp_path, samples_dir, engine, ProofBenchJudge(client), tok).run()
    assert len(client.prompts) == 3  # one per problem: the second sample of each hits the grade cache
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    (tmp_path / "samples.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # the last grade never reached the file
    summary = _evaluator(tmp_path, samples_dir, engine, ProofBenchJudge(client), tok).run()
    assert summary["this_run"]["graded"] == 1 and summary["this_run"]["judge/cache_hits"] == 1
    assert len(client.prompts) == 3 and sum(len(c) for c in engine.calls) == 6
