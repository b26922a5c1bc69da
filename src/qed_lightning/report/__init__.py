"""Seeing a run: rollout records written during RL (`records`), run folders read back (`runs`), and `qed-report`'s
self-contained HTML page (`html`, `cli`: `build_report`). Nothing here imports a module, an engine or a judge: the
RL modules call `records`, and the report reads only files."""

from qed_lightning.report.records import RolloutLog, parse_rollout_log, read_rollouts, rollout_records
from qed_lightning.report.runs import RunNotFound, load_run, read_metrics

__all__ = ["RolloutLog", "RunNotFound", "load_run", "parse_rollout_log", "read_metrics",
           "read_rollouts", "rollout_records"]
