"""The judge audit's numbers (hand-computed), its gap policy, the cheap signals, and the callback's side file and
alarm on a stand-in trainer (the real run is in tests/integration/test_judge_audit_cli.py)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from qed_lightning.callbacks import JudgeAudit
from qed_lightning.report.records import RolloutLog, read_rollouts
from qed_lightning.rewards import Grade
from qed_lightning.rewards.audit import GapPolicy, agreement, char_repetition, flagged, hack_signals, spearman

REPO = Path(__file__).resolve().parents[2]


def test_agreement_numbers_by_hand():
    # train 7 6 2 0, audit 1 6 3 0: diffs 6 0 1 0
    # train mean 15/28 = 0.535714, audit mean 10/28 = 0.357143, gap 5/28 = 0.178571
    # within one point: 3 of 4; mae 7/4 = 1.75
    # ranks train: 0->1, 2->2, 6->3, 7->4 => [4, 3, 2, 1]; audit: 0->1, 1->2, 3->3, 6->4 => [2, 4, 3, 1]
    # d = [2, -1, -1, 0], sum d^2 = 6, rho = 1 - 6*6 / (4 * 15) = 0.4
    m = agreement([7, 6, 2, 0], [1, 6, 3, 0])
    assert m["audit/train_score_mean"] == pytest.approx(15 / 28)
    assert m["audit/score_mean"] == pytest.approx(10 / 28)
    assert m["audit/gap"] == pytest.approx(5 / 28)
    assert m["audit/agree_within_1"] == 0.75
    assert m["audit/mae"] == 1.75
    assert m["audit/spearman"] == pytest.approx(0.4)


def test_spearman_is_nan_safe_and_handles_ties():
    assert math.isnan(spearman([7, 7, 7], [1, 2, 3]))  # a constant side: undefined, not 0
    assert math.isnan(spearman([3], [3]))
    # ties: x ranks [1.5, 1.5, 3], y ranks [1, 2, 3]; Pearson = 0.75 / sqrt(0.5 * 2) = 0.866025
    assert spearman([0, 0, 5], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    with pytest.raises(ValueError, match="equally many"):
        agreement([1, 2], [1])


def test_gap_policy_patience_reset_and_trend():
    p = GapPolicy(max_gap=0.3, patience=2, trend_window=3)
    fired = [p.update(s, g) for s, g in [(0, 0.5), (1, 0.2), (2, 0.4), (3, 0.31), (4, 0.6)]]
    assert fired == [False, False, False, True, True]  # the 0.2 resets the count
    # trend over the last 3: (2, 0.4), (3, 0.31), (4, 0.6): slope = ((-1)(0.4-0.4367) + 1(0.6-0.4367)) / 2 = 0.1
    assert p.trend() == pytest.approx(0.1)


def test_cheap_signals_flag_a_hack_but_only_flag():
    healthy = [{"group": 0, "problem_id": 1, "score": s, "completion_tokens": 20, "proof": "we show that x is even"}
               for s in (2, 5)]
    assert flagged(hack_signals(healthy, None)) == []
    hacked = [{"group": g, "problem_id": g, "score": 7, "completion_tokens": 8, "proof": "e e e e e e"}
              for g in (0, 0, 1, 1)]
    s = hack_signals(hacked, first_length=20.0)
    # length 8 vs 20: drift -0.6; "e e e e e e" has 4 trigrams, 3 repeats: 0.75; both groups flat; all at 7
    assert s["signal/length_drift"] == pytest.approx(-0.6)
    assert s["signal/repetition"] == 0.75
    assert s["signal/flat_groups"] == 1.0 and s["signal/saturated"] == 1.0
    assert flagged(s) == ["signal/length_drift", "signal/repetition", "signal/flat_groups", "signal/saturated"]


def test_character_repetition_sees_runs_inside_words_that_word_ngrams_miss():
    """The demo's hack writes strings of vowels: one long "word" has no repeated word 3-gram, but zlib removes
    nearly all of it; the bundled SFT rows' proofs and reasoning (natural text and LaTeX, 300-1,400 characters) stay
    well below the limit."""
    vowels = [{"group": 0, "problem_id": 0, "score": 7, "completion_tokens": 60, "proof": "aaaaeeeeiiiioooouuuu" * 12},
              {"group": 0, "problem_id": 0, "score": 6, "completion_tokens": 60, "proof": "uoiea" * 40 + " so done"}]
    s = hack_signals(vowels, first_length=60.0)
    assert s["signal/repetition"] == 0.0 and s["signal/char_repetition"] > 0.85  # measured 0.89
    assert flagged(s) == ["signal/char_repetition"]
    proofs = []
    for line in (REPO / "data/samples/fineproofs_sft.jsonl").read_text().splitlines():
        proofs += [v for v in json.loads(line).values() if isinstance(v, str) and len(v) > 300]
    shares = [char_repetition(p) for p in proofs]
    assert len(shares) >= 20 and 0.2 < min(shares) and max(shares) < 0.7  # measured 0.31-0.57
    natural = [{"group": i, "problem_id": i, "score": 3, "completion_tokens": 60, "proof": p}
               for i, p in enumerate(proofs)]
    assert "signal/char_repetition" not in flagged(hack_signals(natural, None))
    assert char_repetition("") == 0.0 and char_repetition("short") == 0.0  # zlib's overhead: nothing removed


class _Judge:
    """An audit judge that scores every proof `score` (what the callback needs of a BaseJudge)."""

    def __init__(self, score):
        self.score, self.seen = score, []

    def grade(self, requests):
        self.seen.extend(requests)
        return [Grade(self.score, None if self.score is None else self.score / 7, "ok" if self.score is not None
                      else "parse_fail", f"audit says {self.score}") for _ in requests]

    def pop_metrics(self):
        return {}


class _Logger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def save(self):
        pass


def _trainer(tmp_path):
    return SimpleNamespace(default_root_dir=str(tmp_path), loggers=[_Logger()], is_global_zero=True, global_step=1,
                           should_stop=False, strategy=SimpleNamespace(broadcast=lambda x: x))


def _records(step, scores):
    return [{"step": step, "problem_id": i // 2, "group": i // 2, "sample": i % 2, "problem": "P", "rubric": "R",
             "completion": f"proof {i}", "proof": f"proof {i}", "score": s,
             "status": "ok" if s is not None else "error", "completion_tokens": 10} for i, s in enumerate(scores)]


def test_audit_writes_side_file_joined_by_readers_and_warns(tmp_path, caplog):
    trainer, judge = _trainer(tmp_path), _Judge(1)
    records = _records(0, [7, 6, None, 5])
    RolloutLog.write(tmp_path, 0, records)
    audit = JudgeAudit(judge, sample=2, max_gap=0.3, seed=3)
    with caplog.at_level(logging.WARNING):
        audit._audit_step(trainer, records)
        audit.collect(trainer, timeout=10)
    chosen = audit.choose(records, 0)
    assert len(chosen) == 2 and 2 not in chosen  # the judge failure (index 2) is never audited
    assert chosen == JudgeAudit(judge, sample=2, seed=3).choose(records, 0)  # seeded
    back = read_rollouts(tmp_path)
    assert [r.get("audit_score") for r in back] == [1 if i in chosen else None for i in range(4)]
    assert back[chosen[0]]["audit_reply"] == "audit says 1" and "score" in back[chosen[0]]
    (step, m), = [(s, m) for s, m in trainer.loggers[0].rows if "audit/gap" in m]
    train = sum(records[i]["score"] for i in chosen) / 2
    assert step == 0 and m["audit/gap"] == pytest.approx((train - 1) / 7) and m["audit/failed"] == 0
    assert "possible reward hacking at step 0" in caplog.text and "warn" in caplog.text
    assert not trainer.should_stop  # warn never stops


def test_stop_policy_saves_and_stops_after_patience(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr("qed_lightning.callbacks.audit.save_checkpoint_atomic", lambda t, p: saved.append(p))
    trainer = _trainer(tmp_path)
    audit = JudgeAudit(_Judge(0), sample=4, max_gap=0.5, patience=2, on_gap="stop")
    for step in range(3):
        trainer.global_step = step + 1
        audit.on_train_batch_end(trainer, SimpleNamespace(last_rollouts=_records(step, [7, 7, 6, 6])), None, None, 0)
        audit.collect(trainer, timeout=10)
        if step == 0:
            assert not trainer.should_stop and audit.alarm is None  # one audit past max_gap is not yet patience 2
    assert trainer.should_stop and len(saved) == 1 and "audit-stop-step=" in str(saved[0])
    evidence = (tmp_path / "audit" / "alarm.json").read_text()
    assert '"step": 1' in evidence and '"train_score": 7' in evidence


def test_failed_audit_grades_are_counted_not_scored(tmp_path):
    trainer = _trainer(tmp_path)
    audit = JudgeAudit(_Judge(None), sample=4)
    audit._audit_step(trainer, _records(0, [3, 4]))
    audit.collect(trainer, timeout=10)
    (m,) = [m for _, m in trainer.loggers[0].rows if "audit/failed" in m]
    assert m["audit/failed"] == 2 and "audit/gap" not in m


def test_bad_config_names_the_knob():
    with pytest.raises(ValueError, match="sample >= 1"):
        JudgeAudit(_Judge(1), sample=0)
