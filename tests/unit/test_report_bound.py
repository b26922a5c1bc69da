"""The report's size bounds (`qed_lightning.report.bound`, `qed-report --max_chars/--max_mb/--rollouts_per_step`):
whole groups kept, long texts cut with a pointer to their record, the page under its bound, each cut reported."""

from __future__ import annotations

import json
import logging

import pytest

from qed_lightning.report.bound import cut_text, fit_groups, pick_groups, read_groups
from qed_lightning.report.cli import build_report
from qed_lightning.report.records import RolloutLog


def _run(root, steps=3, groups=4, g=4, chars=100):
    """`steps` step files of `groups` GRPO groups of `g` rollouts, each completion `chars` long."""
    for step in range(steps):
        RolloutLog.write(root, step, [{"step": step, "group": i // g, "problem_id": 10 + i // g, "sample": i % g,
                                       "completion": f"{step}/{i}:" + "x" * chars, "score": i % 8}
                                      for i in range(groups * g)])
    return root


def test_cut_text_keeps_head_and_tail_and_names_the_record():
    text = "H" * 600 + "m" * 1000 + "T" * 200
    cut = cut_text(text, 800, "rollouts/step_000002.jsonl:5")
    head, marker, tail = cut.split("\n")
    assert head == "H" * 600 and tail == "T" * 200  # 3/4 of the bound from the start, 1/4 from the end
    assert marker == "[... 1,000 of 1,800 characters cut: the whole text is in rollouts/step_000002.jsonl:5 ...]"
    assert cut_text(text, 1800, "x") == text  # a text that fits is left alone


def test_groups_are_kept_whole_and_spread_over_the_step():
    assert pick_groups([4] * 4, None) == [0, 1, 2, 3]
    assert pick_groups([4] * 4, 8) == [0, 3]  # two whole groups, first and last
    assert pick_groups([4] * 4, 7) == [0]  # never half a group
    assert pick_groups([16], 4) == [0]  # at least one group, whole, even past the count


def test_read_groups_keeps_whole_groups_and_points_each_cut_text_to_its_line(tmp_path):
    records, stats = read_groups(_run(tmp_path), per_step=8, max_chars=40)
    assert stats == {"records": 48, "kept": 24, "texts_cut": 24}
    assert [(r["step"], r["group"], r["sample"]) for r in records[:8]] == \
        [(0, 0, k) for k in range(4)] + [(0, 3, k) for k in range(4)]
    last = records[-1]  # step 2, group 3, sample 3: line 16 of its file
    assert last["_at"] == "rollouts/step_000002.jsonl:16" and last["_cut"] == {"completion": 105}
    assert last["completion"].startswith("2/15:")
    assert "whole text is in rollouts/step_000002.jsonl:16" in last["completion"]
    line = (tmp_path / "rollouts/step_000002.jsonl").read_text().splitlines()[15]
    assert json.loads(line)["completion"] == "2/15:" + "x" * 100  # the pointer leads to the whole text
    whole, stats = read_groups(tmp_path, per_step=None, max_chars=None)
    assert len(whole) == 48 and stats["texts_cut"] == 0 and "_cut" not in whole[0]


def test_fit_groups_drops_whole_groups_taking_the_steps_in_turn():
    rollouts = [{"step": s, "group": g, "problem_id": g, "sample": k, "t": "x" * 90}
                for s in range(3) for g in range(4) for k in range(2)]
    runs = [{"rollouts": rollouts}]
    one_group = sum(len(json.dumps(r)) + 1 for r in rollouts[:2])
    assert fit_groups(runs, 10**9) == 0 and len(runs[0]["rollouts"]) == 24
    assert fit_groups(runs, 4 * one_group) == 16  # 4 groups fit: the first of each step, then step 0's second
    assert [(r["step"], r["group"]) for r in runs[0]["rollouts"][::2]] == [(0, 0), (0, 1), (1, 0), (2, 0)]


def test_a_report_over_its_bounds_says_what_it_cut_and_stays_under_max_mb(tmp_path, caplog):
    run = _run(tmp_path / "run", steps=4, groups=8, g=4, chars=50_000)  # 6.4 MB of completions
    with caplog.at_level(logging.WARNING):
        page = build_report([run], tmp_path / "r.html", rollouts_per_step=16, max_chars=20_000, max_mb=1.5)
    assert page.stat().st_size <= 1.5e6
    text = page.read_text()
    rollouts = json.loads(text.split('<script id="qed-rollouts" type="application/json">')[1].split("</script>")[0])[0]
    assert 0 < len(rollouts) < 64 and len(rollouts) % 4 == 0  # whole groups of 4, fewer than 4 steps x 16
    assert {r["step"] for r in rollouts} == {0, 1, 2, 3}  # every step keeps some
    warned = [r.getMessage() for r in caplog.records]
    assert any("64 long texts are cut to 20,000 characters" in w for w in warned)
    assert any(f"{64 - len(rollouts)} of 64 rollout records" in w and "--max_mb 1.5" in w for w in warned)
    data = text.split('<script id="qed-data" type="application/json">')[1].split("</script>")[0]
    assert "64 long texts are cut" in data


def test_bounds_that_make_no_sense_name_their_flag(tmp_path):
    with pytest.raises(ValueError, match="--max_mb must be > 0"):
        build_report([_run(tmp_path)], tmp_path / "r.html", max_mb=0)
