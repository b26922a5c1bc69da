"""Eval metric arithmetic against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qed_lightning.eval.metrics import JudgeAgreement, ProofScore, agreement_summary, score_summary
from qed_lightning.eval.report import summarize

NAN = math.nan

# Two problems x two runs. Problem A: 7 (run 0), 1 (run 1). Problem B: judge failure (run 0), 0 (run 1).
SCORES = torch.tensor([7.0, 1.0, NAN, 0.0])
PROBLEM = torch.tensor([0, 0, 1, 1])
RUN = torch.tensor([0, 1, 0, 1])
TRUNCATED = torch.tensor([False, True, False, True])
NO_PROOF = torch.tensor([False, False, False, True])
TOKENS = torch.tensor([10.0, 20.0, 30.0, 40.0])


def test_score_summary_counts_a_failure_as_zero_by_default():
    # values [7, 1, 0, 0]: mean 2 -> 2/7 = 28.571%.
    # run 0: (7 + 0)/2 = 3.5 -> 50%; run 1: (1 + 0)/2 = 0.5 -> 7.142857%; sample std = 42.857143/sqrt(2) = 30.304576.
    # best of n: A max 7 -> 100%, B max 0 -> 0%; mean 50%. failures 1/4, truncated 2/4, no proof 1/4, tokens 25.
    out = score_summary(SCORES, PROBLEM, RUN, TRUNCATED, NO_PROOF, TOKENS)
    assert out["score_pct"].item() == pytest.approx(28.571429, abs=1e-5)
    assert out["std_pct"].item() == pytest.approx(30.304576, abs=1e-5)
    assert out["best_of_n_pct"].item() == pytest.approx(50.0)
    assert out["failure_rate"].item() == pytest.approx(0.25)
    assert out["truncation_rate"].item() == pytest.approx(0.5)
    assert out["no_proof_rate"].item() == pytest.approx(0.25)
    assert out["tokens_mean"].item() == pytest.approx(25.0)
    assert (out["n"].item(), out["problems"].item(), out["runs"].item()) == (4, 2, 2)


def test_score_summary_drops_failures_when_asked():
    # values [7, 1, 0] (B's failed run 0 left out): mean 8/3 -> 38.095238%.
    # run 0: A alone, 7 -> 100%; run 1: (1 + 0)/2 -> 7.142857%; std = 92.857143/sqrt(2) = 65.659915.
    # best of n: A 7, B 0 -> 50%. The failure still counts in failure_rate.
    out = score_summary(SCORES, PROBLEM, RUN, TRUNCATED, NO_PROOF, TOKENS, failure_mode="drop")
    assert out["score_pct"].item() == pytest.approx(38.095238, abs=1e-5)
    assert out["std_pct"].item() == pytest.approx(65.659915, abs=1e-5)
    assert out["best_of_n_pct"].item() == pytest.approx(50.0)
    assert out["failure_rate"].item() == pytest.approx(0.25)


def test_single_run_has_zero_std_and_best_of_one_equals_the_mean():
    out = score_summary(torch.tensor([7.0, 0.0, 6.0]), torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long),
                        torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool), torch.zeros(3))
    # (7 + 0 + 6)/3 = 13/3 -> 61.904762%
    assert out["score_pct"].item() == pytest.approx(61.904762, abs=1e-5)
    assert out["best_of_n_pct"].item() == pytest.approx(61.904762, abs=1e-5)
    assert out["std_pct"].item() == 0.0


def test_proof_score_metric_accumulates_batches_like_one_call():
    metric = ProofScore()
    metric.update(SCORES[:2], PROBLEM[:2], RUN[:2], TRUNCATED[:2], NO_PROOF[:2], TOKENS[:2])
    metric.update(SCORES[2:], PROBLEM[2:], RUN[2:], TRUNCATED[2:], NO_PROOF[2:], TOKENS[2:])
    got, want = metric.compute(), score_summary(SCORES, PROBLEM, RUN, TRUNCATED, NO_PROOF, TOKENS)
    assert {k: round(v.item(), 6) for k, v in got.items()} == {k: round(v.item(), 6) for k, v in want.items()}
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = metric.compute()
    assert empty["n"].item() == 0 and empty["score_pct"].item() == 0.0
    with pytest.raises(ValueError, match="failure_mode"):
        ProofScore("ignore")


def _row(pid, sample, score, category, status="ok", truncated=False, tokens=100):
    return {"problem_id": pid, "sample": sample, "scaffold": "direct", "score": score, "status": status,
            "truncated": truncated, "tokens": tokens, "category": category}


def test_summary_breaks_down_per_category_with_histogram():
    rows = [_row("a", 0, 7, "Algebra"), _row("a", 1, 6, "Algebra"),
            _row("g", 0, 0, "Geometry", status="truncated", truncated=True, tokens=300),
            _row("g", 1, None, "Geometry", status="error")]
    summary = summarize(rows)["direct"]
    # overall: (7 + 6 + 0 + 0)/4 = 3.25 -> 46.428571%; run 0: (7+0)/2 -> 50%, run 1: (6+0)/2 -> 42.857143%
    assert summary["overall"]["score_pct"] == pytest.approx(46.428571, abs=1e-5)
    assert summary["overall"]["std_pct"] == pytest.approx(7.142857 / math.sqrt(2), abs=1e-5)
    assert summary["overall"]["tokens_mean"] == pytest.approx(150.0)
    # Algebra: (7 + 6)/2 = 6.5 -> 92.857143%, best 100%; Geometry: 0%, one failure and one truncation out of 2
    algebra, geometry = summary["by_category"]["Algebra"], summary["by_category"]["Geometry"]
    assert algebra["score_pct"] == pytest.approx(92.857143, abs=1e-5)
    assert algebra["best_of_n_pct"] == pytest.approx(100.0)
    assert geometry["score_pct"] == 0.0 and geometry["failure_rate"] == 0.5
    assert geometry["truncation_rate"] == 0.5 and geometry["no_proof_rate"] == 0.5
    assert summary["histogram"] == {"0": 1, "1": 0, "2": 0, "3": 0, "4": 0, "5": 0, "6": 1, "7": 1, "fail": 1}


def test_agreement_numbers_by_hand():
    # P1: human [7, 0, 6], judge [7, 1, 4]. P2: human [1, 1], judge [0, failure].
    # kept pairs (j, h): (7,7) (1,0) (4,6) (0,1). MAE = (0 + 1 + 2 + 1)/4 = 1.0
    # buckets: 7/7 same, 1 vs 0 differ, 4 vs 6 same ({4-6}), 0 vs 1 differ -> 0.5
    # advantages, P1: judge mean 4, human mean 13/3; j - 4 = [3, -3, 0], h - 13/3 = [8/3, -13/3, 5/3]
    #   |diff| = [1/3, 4/3, 5/3]; P2 (its one kept sample): 0 - 0 vs 1 - 1 -> 0. Mean (10/3)/4 = 0.833333
    problem = torch.tensor([0, 0, 0, 1, 1])
    judge = torch.tensor([7.0, 1.0, 4.0, 0.0, NAN])
    human = torch.tensor([7.0, 0.0, 6.0, 1.0, 1.0])
    out = agreement_summary(problem, judge, human)
    assert out["mae"].item() == pytest.approx(1.0)
    assert out["bucket_accuracy"].item() == pytest.approx(0.5)
    assert out["advantage_mae"].item() == pytest.approx(0.833333, abs=1e-6)
    assert out["n"].item() == 4 and out["failure_rate"].item() == pytest.approx(0.2)
    metric = JudgeAgreement()
    metric.update(problem[:2], judge[:2], human[:2])
    metric.update(problem[2:], judge[2:], human[2:])
    assert metric.compute()["advantage_mae"].item() == pytest.approx(0.833333, abs=1e-6)


def test_a_judge_that_is_off_by_a_constant_keeps_every_advantage():
    # judge = human - 1 everywhere: MAE 1, but within-problem advantages are identical -> 0
    human = torch.tensor([7.0, 1.0, 6.0, 1.0])
    out = agreement_summary(torch.tensor([0, 0, 1, 1]), human - 1, human)
    assert out["mae"].item() == pytest.approx(1.0)
    assert out["advantage_mae"].item() == pytest.approx(0.0)
    # buckets (judge vs human): 6 vs 7 differ, 0 vs 1 differ, 5 vs 6 agree ({4-6}), 0 vs 1 differ -> 1/4
    assert out["bucket_accuracy"].item() == pytest.approx(0.25)
