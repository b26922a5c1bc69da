"""Evaluation metrics as torchmetrics `Metric`s, so `qed-eval` and the RL validation callback share one code path.

`ProofScore` accumulates one entry per graded sample (score 0..7 or NaN for a judge failure, its problem and run
index, truncation flags, tokens) and `compute()` returns a dict:
- `score_pct`: mean score as a percentage of 7 (SPEC 6);
- `std_pct`: the std of the per-run means, where run k is the k-th sample of every problem (n samples = n runs);
  the sample std (ddof = 1), 0 with a single run;
- `best_of_n_pct`: per problem the best of its samples, averaged over problems;
- `failure_rate` (judge error or unparsable reply), `truncation_rate` (the final generation hit its token budget),
  `no_proof_rate` (no `</think>` or an empty proof: scored 0 without a judge call), `tokens_mean` (per sample);
- `n`, `problems`, `runs`: counts.
Judge failures follow the judge's `on_failure`: "zero" counts them as 0 in every mean (paper), "drop" leaves them out.

`JudgeAgreement` compares judge scores with human scores of the same samples: mean absolute error, accuracy over the
buckets {0}, {1-3}, {4-6}, {7}, and how well the judge preserves within-problem advantages,
`mean_i |(s_i - mean_{p(i)} s) - (h_i - mean_{p(i)} h)|` (what GRPO's baseline-subtracted reward sees). Samples the
judge failed on are left out of these numbers and counted in `failure_rate`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["JudgeAgreement", "ProofScore", "agreement_summary", "score_bucket", "score_summary"]

MAX_SCORE = 7.0
FailureMode = Literal["zero", "drop"]


def _group_reduce(values: Tensor, groups: Tensor, reduce: Literal["mean", "amax"]) -> Tensor:
    """One reduced value per distinct group id (sorted by id): `[G]`."""
    ids, index = torch.unique(groups, return_inverse=True)
    out = torch.zeros(len(ids), dtype=values.dtype)
    return out.scatter_reduce(0, index, values, reduce=reduce, include_self=False)


def score_summary(scores: Tensor, problem: Tensor, run: Tensor, truncated: Tensor, no_proof: Tensor, tokens: Tensor,
                  failure_mode: FailureMode = "zero") -> dict[str, Tensor]:
    """The `ProofScore` numbers of `[N]` per-sample tensors (scores: float, NaN = judge failure); see the module doc."""
    scores = scores.double()
    failed = torch.isnan(scores)
    kept = ~failed if failure_mode == "drop" else torch.ones_like(failed)
    values = torch.nan_to_num(scores, nan=0.0)[kept]  # [M]
    pct = 100.0 / MAX_SCORE
    zero = torch.tensor(0.0, dtype=torch.float64)
    run_means = _group_reduce(values, run[kept], "mean") * pct if values.numel() else zero[None]  # [R]
    best = _group_reduce(values, problem[kept], "amax") * pct if values.numel() else zero[None]  # [P]
    n = scores.numel()
    return {
        "score_pct": values.mean() * pct if values.numel() else zero,
        "std_pct": run_means.std() if run_means.numel() > 1 else zero,
        "best_of_n_pct": best.mean(),
        "failure_rate": failed.double().mean() if n else zero,
        "truncation_rate": truncated.double().mean() if n else zero,
        "no_proof_rate": no_proof.double().mean() if n else zero,
        "tokens_mean": tokens.double().mean() if n else zero,
        "n": torch.tensor(float(n), dtype=torch.float64),
        "problems": torch.tensor(float(torch.unique(problem).numel()), dtype=torch.float64),
        "runs": torch.tensor(float(torch.unique(run).numel()), dtype=torch.float64),
    }


def score_bucket(scores: Tensor) -> Tensor:
    """Bucket index of 0..7 scores: {0} -> 0, {1-3} -> 1, {4-6} -> 2, {7} -> 3.

    >>> score_bucket(torch.tensor([0, 1, 3, 4, 6, 7])).tolist()
    [0, 1, 1, 2, 2, 3]
    """
    return (scores >= 1).long() + (scores >= 4).long() + (scores >= 7).long()


def agreement_summary(problem: Tensor, judge: Tensor, human: Tensor) -> dict[str, Tensor]:
    """Judge-vs-human agreement of `[N]` tensors (judge: float, NaN = judge failure); see the module docstring."""
    judge, human = judge.double(), human.double()
    failed = torch.isnan(judge)
    j, h, p = judge[~failed], human[~failed], problem[~failed]
    zero = torch.tensor(0.0, dtype=torch.float64)
    if j.numel() == 0:
        return {"mae": zero, "bucket_accuracy": zero, "advantage_mae": zero, "n": zero,
                "failure_rate": failed.double().mean() if judge.numel() else zero}
    _, index = torch.unique(p, return_inverse=True)
    j_adv = j - _group_reduce(j, p, "mean")[index]  # [M] judge score minus its problem's mean judge score
    h_adv = h - _group_reduce(h, p, "mean")[index]  # [M] the same for the human scores
    return {
        "mae": (j - h).abs().mean(),
        "bucket_accuracy": (score_bucket(j) == score_bucket(h)).double().mean(),
        "advantage_mae": (j_adv - h_adv).abs().mean(),
        "n": torch.tensor(float(j.numel()), dtype=torch.float64),
        "failure_rate": failed.double().mean(),
    }


def _empty(state: list[Tensor] | Tensor) -> bool:
    """A list state is a list before any sync and may be one concatenated tensor after it."""
    return len(state) == 0 if isinstance(state, list) else state.numel() == 0


class ProofScore(Metric):
    """Accumulates graded samples; `compute()` returns the dict of `score_summary`.

    Args:
        failure_mode: "zero" (a judge failure scores 0; paper) or "drop" (left out of the means).
    """

    full_state_update = False
    higher_is_better = True
    _fields = ("scores", "problem", "run", "truncated", "no_proof", "tokens")

    def __init__(self, failure_mode: FailureMode = "zero", **kwargs) -> None:
        super().__init__(**kwargs)
        if failure_mode not in ("zero", "drop"):
            raise ValueError(f"failure_mode must be 'zero' or 'drop', got {failure_mode!r}.")
        self.failure_mode = failure_mode
        for name in self._fields:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, problem: Tensor, run: Tensor, truncated: Tensor | None = None,
               no_proof: Tensor | None = None, tokens: Tensor | None = None) -> None:
        """Add `[N]` samples: scores (NaN = judge failure), problem and run indices, flags, generated tokens."""
        n = scores.numel()
        flags = torch.zeros(n, dtype=torch.bool)
        values = (scores.double(), problem.long(), run.long(), flags if truncated is None else truncated.bool(),
                  flags if no_proof is None else no_proof.bool(), torch.zeros(n) if tokens is None else tokens.double())
        for name, value in zip(self._fields, values, strict=True):
            getattr(self, name).append(value.reshape(-1).cpu())

    def compute(self) -> dict[str, Tensor]:
        if _empty(self.scores):
            empty = torch.zeros(0)
            return score_summary(empty, empty.long(), empty.long(), empty.bool(), empty.bool(), empty,
                                 self.failure_mode)
        states = [dim_zero_cat(getattr(self, name)) for name in self._fields]
        return score_summary(*states, failure_mode=self.failure_mode)


class JudgeAgreement(Metric):
    """Accumulates (problem index, judge score or NaN, human score); `compute()` returns `agreement_summary`."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("problem", "judge", "human"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, problem: Tensor, judge: Tensor, human: Tensor) -> None:
        self.problem.append(problem.long().reshape(-1).cpu())
        self.judge.append(judge.double().reshape(-1).cpu())
        self.human.append(human.double().reshape(-1).cpu())

    def compute(self) -> dict[str, Tensor]:
        if _empty(self.judge):
            empty = torch.zeros(0)
            return agreement_summary(empty.long(), empty, empty)
        return agreement_summary(dim_zero_cat(self.problem), dim_zero_cat(self.judge), dim_zero_cat(self.human))
