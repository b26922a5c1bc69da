"""Reading a run's metrics back, shared by the integration tests that drive `qed-fit`."""

from __future__ import annotations

import csv
from pathlib import Path


def read_metrics(root: Path) -> list[dict[str, float]]:
    """The rows of the single `<root>/csv/version_*/metrics.csv`, empty cells dropped."""
    (run_dir,) = sorted((root / "csv").glob("version_*"))
    with open(run_dir / "metrics.csv") as fh:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]


def series(rows: list[dict[str, float]], key: str) -> list[float]:
    """One metric over the run, in logging order."""
    return [r[key] for r in rows if key in r]
