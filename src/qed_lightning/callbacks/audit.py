"""`JudgeAudit`: a second judge regrades a seeded sample of each RL step's rollouts, off the critical path, and
raises the alarm when the training reward runs away from it (reward hacking).

Design:
- Input: the step's kept rollout records (`RubricRLModule.last_rollouts`, the same records as
  `<run>/rollouts/step_NNNNNN.jsonl`, in file order); the sample is drawn among the records the training judge
  actually scored (status "ok"), seeded by (seed, step), so a rerun audits the same rollouts.
- Off the critical path: the audit judge grades in one background thread (a one-worker executor). At each step's
  end the finished audits are collected and logged at the step they audit (`audit/*`); nothing waits for a
  running audit, and when `max_pending` audits are already queued, a step is skipped (`audit/skipped`) rather
  than slowing training. At the end of fit the unfinished audits get at most `final_wait_s`.
- Records keep both grades: the audit's grades go to the side file `<run>/audit/step_NNNNNN.jsonl`, keyed by the
  record's index in the step's file (`report.records`: `write_audit`, and `join_audit` for the readers,
  `qed-report` among them); the step's file is never rewritten.
- Numbers (`rewards/audit.py`): `audit/score_mean` (audit judge, score / 7), `audit/train_score_mean` (training
  judge on the same rollouts), `audit/gap` (their difference), `audit/agree_within_1`, `audit/mae` (points),
  `audit/spearman` (nan when undefined), `audit/gap_trend` (slope per step over the last `trend_window` audits),
  `audit/samples` and `audit/failed` (audit grades without a score, left out of the other numbers).
- Policy: when the gap exceeds `max_gap` in `patience` consecutive audits, `on_gap="warn"` logs a WARNING with the
  evidence (step, gap, the most disagreeing samples); `on_gap="stop"` also saves a checkpoint through the trainer
  (`<run>/checkpoints/audit-stop-step=N.ckpt`), writes the evidence to `<run>/audit/alarm.json` and stops the run.
- Cheap signals beside it, every step, from all kept records (`signal/*`: length drift, repeated 3-grams,
  character repetition, flat groups, saturated scores), flagged with a WARNING past their limits. Statistical
  detectors alone give false positives (a concise policy drifts in length, a solved problem saturates), so they only
  flag: the audit judge's gap decides the alarm.
Only global rank 0 audits; the stop decision is broadcast so every rank saves and stops together.
"""

from __future__ import annotations

import json
import logging
import random
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from qed_lightning.callbacks.checkpoint import save_checkpoint_atomic
from qed_lightning.report.records import write_audit
from qed_lightning.rewards import BaseJudge, Grade, GradeRequest
from qed_lightning.rewards.audit import GapPolicy, agreement, flagged, hack_signals

__all__ = ["JudgeAudit"]

log = logging.getLogger(__name__)


@dataclass
class _Audit:
    step: int
    indices: list[int]
    records: list[dict]
    future: Future


class JudgeAudit(Callback):
    """Regrade a seeded sample of each RL step's rollouts with a second judge (module docstring).

    Args:
        judge: the audit judge, any judge config (`RubricJudge` with another model, prompt or provider).
        sample: rollouts audited per audited step. every_n_steps: steps between audits (step 0 is audited).
        max_gap: the gap (training minus audit reward, in [-1, 1]) past which an audit counts against the run.
        patience: consecutive audits past `max_gap` before the alarm. trend_window: audits in `audit/gap_trend`.
        on_gap: "warn" (a WARNING with the evidence) or "stop" (checkpoint, evidence, stop the run).
        seed: seeds the sample. max_pending: audits queued before a step's audit is skipped instead.
        final_wait_s: the longest the end of fit waits for unfinished audits.
    """

    def __init__(self, judge: BaseJudge, sample: int = 16, every_n_steps: int = 1, max_gap: float = 0.3,
                 patience: int = 1, on_gap: Literal["warn", "stop"] = "warn", seed: int = 0, trend_window: int = 5,
                 max_pending: int = 2, final_wait_s: float = 300.0) -> None:
        problems = []
        if sample < 1 or every_n_steps < 1 or patience < 1 or trend_window < 2 or max_pending < 1:
            problems.append(f"JudgeAudit needs sample >= 1, every_n_steps >= 1, patience >= 1, trend_window >= 2 and "
                            f"max_pending >= 1, got {sample}, {every_n_steps}, {patience}, {trend_window}, "
                            f"{max_pending}")
        if on_gap not in ("warn", "stop"):
            problems.append(f"JudgeAudit on_gap must be 'warn' or 'stop', got {on_gap!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.judge, self.sample, self.every_n_steps, self.seed = judge, sample, every_n_steps, seed
        self.on_gap, self.max_pending, self.final_wait_s = on_gap, max_pending, final_wait_s
        self.policy = GapPolicy(max_gap, patience, trend_window)
        self.pending: list[_Audit] = []
        self.audited: set[int] = set()
        self.first_length: float | None = None
        self.alarm: dict | None = None  # the evidence of the alarm that stops the run (on_gap="stop")
        self.stopped = False
        self._executor: ThreadPoolExecutor | None = None
        self._warned_empty = False

    # -- choosing and submitting ---------------------------------------------------------------------------------

    def choose(self, records: list[dict], step: int) -> list[int]:
        """Indices (in the step's file) of the records to audit: a seeded draw among those the judge scored."""
        graded = [i for i, r in enumerate(records) if r.get("status") == "ok" and r.get("score") is not None]
        if len(graded) <= self.sample:
            return graded
        return sorted(random.Random(f"{self.seed}/audit/{step}").sample(graded, self.sample))

    def _grade(self, requests: list[GradeRequest]) -> list[Grade]:
        try:
            grades = self.judge.grade(requests)
        except Exception as err:  # a down audit judge must not stop training: its audit counts as failed
            log.warning("JudgeAudit: the audit judge failed (%s: %s); this step's audit counts as failed",
                        type(err).__name__, err)
            grades = [Grade(None, None, "error", str(err)) for _ in requests]
        self.judge.pop_metrics()  # its counters are not the training judge's
        return grades

    def submit(self, records: list[dict], step: int) -> bool:
        indices = self.choose(records, step)
        if not indices:
            return False
        if len(self.pending) >= self.max_pending:
            return False
        chosen = [records[i] for i in indices]
        requests = [GradeRequest(problem=r["problem"], rubric=r["rubric"], response=r["completion"]) for r in chosen]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qed-judge-audit")
        self.pending.append(_Audit(step, indices, chosen, self._executor.submit(self._grade, requests)))
        self.audited.add(step)
        return True

    # -- collecting ----------------------------------------------------------------------------------------------

    def finish(self, trainer: L.Trainer, audit: _Audit, grades: list[Grade]) -> dict[str, float]:
        """Write the side file, compute and log the numbers, apply the policy; returns the metrics."""
        rows = [{"index": i, "audit_score": g.score, "audit_status": g.status, "audit_reply": g.reply}
                for i, g in zip(audit.indices, grades, strict=True)]
        write_audit(trainer.default_root_dir, audit.step, rows)
        pairs = [(r["score"], g.score, i, r) for i, r, g in zip(audit.indices, audit.records, grades, strict=True)
                 if g.score is not None]
        metrics = {"audit/samples": float(len(grades)), "audit/failed": float(len(grades) - len(pairs))}
        if pairs:
            metrics.update(agreement([p[0] for p in pairs], [p[1] for p in pairs]))
            alarm = self.policy.update(audit.step, metrics["audit/gap"])
            metrics["audit/gap_trend"] = self.policy.trend()
            if alarm:
                self.raise_alarm(trainer, audit.step, metrics, pairs)
        _log_at(trainer, metrics, audit.step)
        return metrics

    def raise_alarm(self, trainer: L.Trainer, step: int, metrics: dict[str, float], pairs: list) -> None:
        worst = sorted(pairs, key=lambda p: -abs(p[0] - p[1]))[:3]
        evidence = {"step": step, "gap": metrics["audit/gap"], "max_gap": self.policy.max_gap,
                    "patience": self.policy.patience, "gaps": self.policy.history[-self.policy.patience:],
                    "samples": [{"index": i, "problem_id": r.get("problem_id"), "group": r.get("group"),
                                 "sample": r.get("sample"), "train_score": t, "audit_score": a}
                                for t, a, i, r in worst]}
        ids = ", ".join(f"#{s['index']} (problem {s['problem_id']}: train {s['train_score']}, audit {s['audit_score']})"
                        for s in evidence["samples"])
        action = "stopping the run with a checkpoint" if self.on_gap == "stop" else "on_gap=warn, training goes on"
        log.warning("JudgeAudit: possible reward hacking at step %d: training reward exceeds the audit judge's by "
                    "%.3f (> max_gap %.3f for %d audit(s)); most disagreeing: %s; %s (rollouts/step_%06d.jsonl, "
                    "audit/step_%06d.jsonl)", step, metrics["audit/gap"], self.policy.max_gap, self.policy.patience,
                    ids, action, step, step)
        if self.on_gap == "stop" and self.alarm is None:
            self.alarm = evidence

    def collect(self, trainer: L.Trainer, timeout: float | None = 0.0) -> None:
        """Finish the audits that are done (with `timeout`, wait that long for the rest first)."""
        if timeout and self.pending:
            wait([a.future for a in self.pending], timeout=timeout)
        done = [a for a in self.pending if a.future.done()]
        self.pending = [a for a in self.pending if not a.future.done()]
        for audit in sorted(done, key=lambda a: a.step):
            self.finish(trainer, audit, audit.future.result())

    # -- hooks ---------------------------------------------------------------------------------------------------

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.is_global_zero:
            self._audit_step(trainer, getattr(pl_module, "last_rollouts", None) or [])
        if trainer.strategy.broadcast(self.alarm is not None) and not self.stopped:
            self.stopped = True
            self._stop(trainer)

    def _audit_step(self, trainer: L.Trainer, records: list[dict]) -> None:
        self.collect(trainer)
        if not records:
            if not self._warned_empty:
                log.warning("JudgeAudit: the step kept no rollout records, so nothing is audited; set "
                            "model.rollout_log to 'all' or 'sample:N' (it is 'off')")
                self._warned_empty = True
            return
        step = int(records[0]["step"])
        signals = hack_signals(records, self.first_length)
        self.first_length = self.first_length or signals["signal/length_mean"]
        flags = flagged(signals)
        signals["signal/flags"] = float(len(flags))
        if flags:
            log.warning("JudgeAudit: step %d: cheap hack signals past their limits: %s (flags only: the audit "
                        "judge's gap decides the alarm)", step, ", ".join(f"{k}={signals[k]:.2f}" for k in flags))
        if step % self.every_n_steps == 0 and step not in self.audited and not self.submit(records, step):
            signals["audit/skipped"] = 1.0
        _log_at(trainer, signals, step)

    def _stop(self, trainer: L.Trainer) -> None:
        root = Path(trainer.default_root_dir)
        path = root / "checkpoints" / f"audit-stop-step={trainer.global_step}.ckpt"
        save_checkpoint_atomic(trainer, path)
        if trainer.is_global_zero:
            evidence = {**(self.alarm or {}), "checkpoint": str(path), "stopped_at_step": trainer.global_step}
            (root / "audit").mkdir(parents=True, exist_ok=True)
            (root / "audit" / "alarm.json").write_text(json.dumps(evidence, indent=2), encoding="utf-8")
            log.warning("JudgeAudit: stopped at step %d (on_gap=stop); checkpoint %s, evidence %s",
                        trainer.global_step, path, root / "audit" / "alarm.json")
        trainer.should_stop = True

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.pending:
            self.collect(trainer, timeout=self.final_wait_s)
            if self.pending:
                log.warning("JudgeAudit: %d audit(s) unfinished after final_wait_s=%.0f s are left out (steps %s)",
                            len(self.pending), self.final_wait_s, [a.step for a in self.pending])
            for logger in trainer.loggers:
                logger.save()
        self._shutdown()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self.pending = []


def _log_at(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Log `metrics` to every logger at `step` (the audited step, which may be behind the trainer's)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
