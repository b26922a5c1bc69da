"""Reading run folders back for the report: a `qed-fit` run or a `qed-eval` output folder, as plain JSON-ready dicts.

A training run is its `default_root_dir`: metrics in `csv/version_*/metrics.csv` (Lightning's `CSVLogger`; a resumed
run adds a version, and for a step logged twice the later version wins), its `config.yaml` beside them, and the
rollout records in `rollouts/`. A version folder or a folder holding `metrics.csv` works too. An evaluation folder
holds `summary.json` and `samples.jsonl` (see `qed_lightning.eval.store`).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from qed_lightning.report.bound import cut_texts, read_groups

__all__ = ["RunNotFound", "load_run", "metric_versions", "read_metrics"]

_VERSION = re.compile(r"version_(\d+)$")


class RunNotFound(ValueError):
    """A path that is neither a training run nor an evaluation folder."""


def metric_versions(root: Path) -> list[Path]:
    """The folders that hold this run's `metrics.csv`, oldest first."""
    if (root / "metrics.csv").is_file():
        return [root]
    versions = [p for p in (root / "csv").glob("version_*")
                if (p / "metrics.csv").is_file() and _VERSION.search(p.name)]
    return sorted(versions, key=lambda p: int(_VERSION.search(p.name).group(1)))


def read_metrics(root: str | Path) -> dict[str, list[list[float]]]:
    """Every logged metric of a run as `{name: [[step, value], ...]}` in step order, over all its CSV versions."""
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    for folder in metric_versions(Path(root)):
        with open(folder / "metrics.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                step = row.pop("step", None)
                if step in (None, ""):
                    continue
                for key, value in row.items():
                    if key != "epoch" and value not in (None, ""):
                        number = float(value)
                        if math.isfinite(number):
                            by_step[int(float(step))][key] = number
    series: dict[str, list[list[float]]] = defaultdict(list)
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            series[key].append([step, value])
    return dict(sorted(series.items()))


def _config_text(root: Path, versions: list[Path]) -> str:
    for folder in [*reversed(versions), root]:
        if (folder / "config.yaml").is_file():
            return (folder / "config.yaml").read_text(encoding="utf-8")
    return ""


def _loss_kind(config: str) -> str:
    """What `train/loss` measures in this run, from its config: SFT's token NLL, or the RL policy loss named by its
    aggregation (`token_mean` is DAPO's); runs of different kinds get different loss charts."""
    module = re.search(r"class_path:\s*\S*?(SFTModule|RubricRLModule|ReasoningCacheRLModule)\b", config)
    if module and module.group(1) == "SFTModule":
        return "SFT loss (token NLL)"
    aggregation = re.search(r"^\s*aggregation:\s*(\S+)", config, re.M)
    if module or aggregation:
        agg = aggregation.group(1) if aggregation else "seq_sum_over_batch"
        return "DAPO loss (token_mean)" if agg == "token_mean" else f"RL policy loss ({agg})"
    return "loss"


def _train_run(root: Path, name: str, per_step: int | None, max_chars: int | None) -> dict[str, Any]:
    versions = metric_versions(root)
    in_version = (root / "metrics.csv").is_file() and root.parent.name == "csv"  # <run>/csv/version_N was given
    run_root = root.parent.parent if in_version else root
    config = _config_text(root, versions)
    rollouts, bounds = read_groups(run_root, per_step, max_chars)
    return {"name": name, "kind": "train", "path": str(root), "metrics": read_metrics(root), "config": config,
            "loss_kind": _loss_kind(config), "rollouts": rollouts, "bounds": bounds}


def _eval_samples(root: Path) -> list[dict[str, Any]]:
    from qed_lightning.eval.store import SampleStore

    rows = list(SampleStore(root).graded().values())
    return [{"step": None, "problem_id": r["problem_id"], "sample": r["sample"], "scaffold": r["scaffold"],
             "source": r.get("source", ""), "category": r.get("category", ""), "prompt": r.get("prompt", ""),
             "completion": r.get("output", ""), "proof": None, "score": r.get("score"), "reward": r.get("reward"),
             "status": r.get("status"), "judge_reply": r.get("judge_reply", ""), "judge_cached": r.get("judge_cached"),
             "finish_reason": "length" if r.get("truncated") else "stop", "completion_tokens": r.get("tokens")}
            for r in rows]


def _per_problem(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean score (failures as 0) and sample count per (scaffold, problem)."""
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for s in samples:
        groups[(s["scaffold"], str(s["problem_id"]))].append(float(s["score"] or 0))
    return [{"scaffold": k[0], "problem_id": k[1], "n": len(v), "mean_score": sum(v) / len(v)}
            for k, v in sorted(groups.items())]


def _eval_run(root: Path, name: str, max_chars: int | None) -> dict[str, Any]:
    summary_path = root / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    samples = _eval_samples(root)
    per_problem = _per_problem(samples)
    cut = sum(cut_texts(s, max_chars, f"samples.jsonl (problem {s['problem_id']}, sample {s['sample']})")
              for s in samples)
    return {"name": name, "kind": "eval", "path": str(root), "summary": summary, "rollouts": samples,
            "per_problem": per_problem, "metrics": {}, "config": "",
            "bounds": {"records": len(samples), "kept": len(samples), "texts_cut": cut}}


def load_run(path: str | Path, name: str | None = None, per_step: int | None = 64,
             max_chars: int | None = None) -> dict[str, Any]:
    """A run folder as a dict: name, kind ("train" or "eval"), path, metrics, config, rollouts, bounds (what was
    read, kept and cut: `qed_lightning.report.bound`), for training runs loss_kind, and for evaluations summary and
    per_problem. `per_step` caps the rollout records per step, whole groups kept (None = all); `max_chars` cuts
    each long text (None = whole)."""
    root = Path(path)
    name = name or root.name
    if not root.is_dir():
        raise RunNotFound(f"{path}: no such folder; pass a qed-fit run folder (its trainer.default_root_dir) or a "
                          "qed-eval output_dir")
    if (root / "summary.json").is_file() or (root / "samples.jsonl").is_file():
        return _eval_run(root, name, max_chars)
    if metric_versions(root) or (root / "rollouts").is_dir():
        return _train_run(root, name, per_step, max_chars)
    raise RunNotFound(f"{path}: neither a training run (no csv/version_*/metrics.csv, no rollouts/) nor an "
                      "evaluation folder (no summary.json or samples.jsonl); pass the run's "
                      "trainer.default_root_dir or a qed-eval output_dir")
