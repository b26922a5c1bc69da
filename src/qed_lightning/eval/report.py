"""Reports of an evaluation: the summary JSON, a rich table in the terminal, and a PNG of the score distribution.

Everything here is computed from the graded sample records (`samples.jsonl`), never from in-memory state, so a
resumed run reports exactly what a run without interruption would. Numbers come from `ProofScore` (see
`metrics`), overall and per group (category, level and source where the benchmark has them), per scaffold.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from qed_lightning.eval.metrics import FailureMode, ProofScore

__all__ = ["print_agreement", "plot_scores", "print_table", "summarize", "write_json"]

GROUP_FIELDS = ("category", "level", "source")
TABLE_GROUPS = ("category", "level")  # sources are often one per problem: in the JSON only
HISTOGRAM_BINS = [str(s) for s in range(8)] + ["fail"]


def score_metrics(rows: list[dict[str, Any]], failure_mode: FailureMode = "zero") -> dict[str, float]:
    """`ProofScore` over graded sample records (score None = judge failure; run = the sample index)."""
    ids = {pid: i for i, pid in enumerate(dict.fromkeys(r["problem_id"] for r in rows))}
    metric = ProofScore(failure_mode)
    if rows:
        metric.update(
            scores=torch.tensor([math.nan if r["score"] is None else float(r["score"]) for r in rows]),
            problem=torch.tensor([ids[r["problem_id"]] for r in rows]),
            run=torch.tensor([int(r["sample"]) for r in rows]),
            truncated=torch.tensor([bool(r.get("truncated")) for r in rows]),
            no_proof=torch.tensor([r["status"] == "truncated" for r in rows]),
            tokens=torch.tensor([float(r.get("tokens") or 0) for r in rows]),
        )
    return {name: float(value) for name, value in metric.compute().items()}


def histogram(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many samples got each score 0..7, and how many the judge failed on ("fail")."""
    counts = Counter("fail" if r["score"] is None else str(r["score"]) for r in rows)
    return {label: counts.get(label, 0) for label in HISTOGRAM_BINS}


def summarize(rows: list[dict[str, Any]], failure_mode: FailureMode = "zero") -> dict[str, Any]:
    """Per scaffold: overall metrics, per-group metrics and the score histogram."""
    by_scaffold: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_scaffold[row["scaffold"]].append(row)
    summary = {}
    for scaffold, group in by_scaffold.items():
        entry: dict[str, Any] = {"overall": score_metrics(group, failure_mode), "histogram": histogram(group)}
        for field in GROUP_FIELDS:
            values = sorted({r[field] for r in group if r.get(field)})
            if values:
                entry[f"by_{field}"] = {v: score_metrics([r for r in group if r.get(field) == v], failure_mode)
                                        for v in values}
        summary[scaffold] = entry
    return summary


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def _metric_cells(m: dict[str, float]) -> list[str]:
    return [f"{m['n']:.0f}", f"{m['score_pct']:.1f}", f"{m['std_pct']:.1f}", f"{m['best_of_n_pct']:.1f}",
            f"{100 * m['failure_rate']:.1f}", f"{100 * m['truncation_rate']:.1f}", f"{m['tokens_mean']:.0f}"]


def print_table(summary: dict[str, Any], title: str, console: Console | None = None) -> None:
    """The summary as a rich table: one block per scaffold, overall first, then each category and level."""
    console = console or Console(width=140)
    table = Table(title=title)
    headers = ("scaffold", "group", "samples", "score %", "std %", "best-of-n %", "judge fail %", "trunc %",
               "tokens/problem")
    for header in headers:
        table.add_column(header, justify="left" if header in ("scaffold", "group") else "right")
    for scaffold, entry in summary.items():
        table.add_row(scaffold, "overall", *_metric_cells(entry["overall"]), style="bold")
        for field in TABLE_GROUPS:
            for value, metrics in entry.get(f"by_{field}", {}).items():
                table.add_row("", f"{field}: {value}", *_metric_cells(metrics))
        table.add_section()
    console.print(table)


def plot_scores(summary: dict[str, Any], path: str | Path, title: str) -> Path:
    """Grouped bars: the share of samples at each score (and judge failures), one colour per scaffold."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, no GUI backend and no global state

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    width = 0.8 / max(len(summary), 1)
    for k, (scaffold, entry) in enumerate(summary.items()):
        counts = [entry["histogram"][label] for label in HISTOGRAM_BINS]
        total = max(sum(counts), 1)
        xs = [i + (k - (len(summary) - 1) / 2) * width for i in range(len(HISTOGRAM_BINS))]
        ax.bar(xs, [c / total for c in counts], width=width,
               label=f"{scaffold} ({entry['overall']['score_pct']:.1f}%)")
    ax.set_xticks(range(len(HISTOGRAM_BINS)), HISTOGRAM_BINS)
    ax.set_xlabel("score (out of 7)")
    ax.set_ylabel("share of samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def print_agreement(metrics: dict[str, float], title: str, console: Console | None = None) -> None:
    """Judge-agreement numbers as a rich table."""
    console = console or Console(width=140)
    table = Table(title=title)
    for header in ("samples", "MAE (points)", "bucket accuracy %", "advantage MAE", "judge fail %"):
        table.add_column(header, justify="right")
    table.add_row(f"{metrics['n']:.0f}", f"{metrics['mae']:.2f}", f"{100 * metrics['bucket_accuracy']:.1f}",
                  f"{metrics['advantage_mae']:.2f}", f"{100 * metrics['failure_rate']:.1f}")
    console.print(table)


def print_audit(audit: dict[str, Any], title: str, console: Console | None = None) -> None:
    """Two judges' agreement on the same samples (`Evaluator.audit`) as a rich table."""
    console = console or Console(width=140)
    table = Table(title=title)
    for header in ("samples", "audit failed", "judge mean", "audit mean", "gap", "within 1 pt %", "MAE (points)",
                   "Spearman"):
        table.add_column(header, justify="right")
    if "mae" not in audit:  # nothing both judges scored
        table.add_row(f"{audit['samples']}", f"{audit['failed']}", *["-"] * 6)
    else:
        spearman = "undefined" if audit["spearman"] is None else f"{audit['spearman']:.2f}"
        table.add_row(f"{audit['samples']}", f"{audit['failed']}", f"{audit['judge_score_mean']:.3f}",
                      f"{audit['audit_score_mean']:.3f}", f"{audit['gap']:+.3f}",
                      f"{100 * audit['agree_within_1']:.1f}",
                      f"{audit['mae']:.2f}", spearman)
    console.print(table)
