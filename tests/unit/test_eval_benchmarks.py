"""Benchmark loading: the three bundled shapes, column mapping, and errors that name the row and the column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qed_lightning.data.loading import DataError
from qed_lightning.eval import IMOProofBench, ProofBench, RubricBenchmark


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _imo_row(i: int, **overrides) -> dict:
    row = {"problem_id": f"P{i}", "problem": f"Prove claim {i}.", "solution": "Because.",
           "grading_guidelines": "(Partial) 1.", "category": "Algebra", "level": "Basic", "source": "test"}
    return {**row, **overrides}


def test_bundled_samples_load_in_all_three_shapes(samples_dir):
    imo = IMOProofBench(str(samples_dir / "imo_proofbench.jsonl")).load()
    assert len(imo) == 12 and imo[0].problem_id == "PB-Basic-001"
    assert imo[0].reference_solution.startswith("By the Sophie Germain identity")
    assert imo[0].meta == {"category": "Number Theory", "level": "Basic", "source": "Classic (Sophie Germain identity)"}
    proofbench = ProofBench(str(samples_dir / "proofbench.jsonl")).load()
    # the grading_scheme list is rendered through render_rubric
    assert proofbench[0].rubric.startswith("# Setup (1 points)\nDescription: Assumes $e = p/q$")
    rl = RubricBenchmark(str(samples_dir / "fineproofs_rl.jsonl")).load()
    assert rl[0].rubric.startswith("## Checkpoints") and rl[0].problem_id.startswith("row-0-")
    assert len({p.problem_id for p in rl}) == len(rl)


def test_an_empty_value_is_reported_with_its_line_and_column(tmp_path):
    path = _write(tmp_path / "b.jsonl", [_imo_row(0), _imo_row(1, grading_guidelines="  "), _imo_row(2, problem=None)])
    with pytest.raises(DataError) as err:
        IMOProofBench(path).load()
    message = str(err.value)
    assert "line 2, column 'grading_guidelines': empty string" in message  # lines of the file, from 1
    assert "line 3, column 'problem': null value" in message


def test_a_missing_column_names_the_mapping_to_set(tmp_path):
    path = _write(tmp_path / "b.jsonl", [{"problem_id": "x", "problem": "p", "grading_guidelines": "g"}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['solution'\].*columns: \{our_field: your_column\}"):
        IMOProofBench(path).load()


def test_columns_map_other_names(tmp_path):
    rows = [{"ID": "q1", "Problem": "Prove it.", "Solution": "Done.", "Guidelines": "g", "Topic": "Geometry"}]
    path = _write(tmp_path / "b.jsonl", rows)
    columns = {"problem_id": "ID", "problem": "Problem", "reference_solution": "Solution", "guidelines": "Guidelines",
               "category": "Topic"}
    (problem,) = IMOProofBench(path, columns=columns).load()
    assert ((problem.problem_id, problem.problem, problem.guidelines, problem.meta)
            == ("q1", "Prove it.", "g", {"category": "Geometry"}))
    with pytest.raises(DataError, match=r"maps level -> 'Level'.*no such column"):
        IMOProofBench(path, columns={**columns, "level": "Level"}).load()


def test_a_rubric_that_is_not_worth_7_points_is_refused(tmp_path):
    scheme = [{"title": "Setup", "points": 2, "desc": "a"}, {"title": "Rest", "points": 3, "desc": "b"}]
    path = _write(tmp_path / "b.jsonl", [{"problem_id": "x", "problem": "p", "grading_scheme": scheme}])
    with pytest.raises(DataError, match=r"line 1, column 'grading_scheme': rubric items total 5 points, expected 7"):
        ProofBench(path).load()


def test_duplicate_problem_ids_are_refused_with_their_lines(tmp_path):
    path = _write(tmp_path / "b.jsonl", [_imo_row(0), _imo_row(1), _imo_row(2, problem_id="P0")])
    with pytest.raises(DataError, match=r"'problem_id' must be unique.*'P0' in lines \[1, 3\]"):
        IMOProofBench(path).load()


def test_problem_ids_and_limit_select_problems(tmp_path):
    path = _write(tmp_path / "b.jsonl", [_imo_row(i) for i in range(5)])
    assert [p.problem_id for p in IMOProofBench(path, limit=2).load()] == ["P0", "P1"]
    assert [p.problem_id for p in IMOProofBench(path, problem_ids=["P3", "P1"]).load()] == ["P1", "P3"]
    assert len(IMOProofBench(path, limit=2).load(select=False)) == 5
    with pytest.raises(DataError, match=r"problem_ids \['P9'\] are not in the file"):
        IMOProofBench(path, problem_ids=["P9"]).load()
    with pytest.raises(ValueError, match="limit must be >= 1"):
        IMOProofBench(path, limit=0)


def test_a_hub_id_offline_says_to_use_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="local"):
        IMOProofBench("lm-provers/IMOProofBench").load()
