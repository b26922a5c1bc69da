"""Rollout records: what an RL step generated, kept as `<run>/rollouts/step_NNNNNN.jsonl` (one JSON object a line).

One record per rollout: the problem (id, statement, rubric), the decoded prompt, the completion, the text the judge
graded (after the last `</think>`; None when nothing was graded), score, reward, advantage, judge status and reply,
finish reason, token lengths, the policy version that sampled it, and for stage 3 the RC cycle, whether the state
was replayed, and the state's summary. `model.rollout_log` chooses how many are kept: `all`, `sample:N` (N per step,
chosen by a seeded draw, the same after a resume) or `off`.

Written atomically: a step's file is written under a temporary name and renamed into place, so a reader (or a
killed run) sees the whole step or none of it. Consistent with resume: the run that resumes at step k removes the
files of steps >= k before training (the killed run may have written some after its last checkpoint), and writes
them again as it redoes those steps, so no step appears twice and no step is left from the abandoned run.

Judge audit (`callbacks.JudgeAudit`): a second judge regrades a sample of a step's records after the step's file is
written, so its grades go to a side file, `<run>/audit/step_NNNNNN.jsonl`, one object per audited record: `index`
(the record's 0-based line in the step's file), `audit_score`, `audit_status`, `audit_reply`. The step file is never
rewritten; readers join the two by index (`join_audit`: the audited records gain those three keys). Side files are
written atomically too and forgotten with their step on resume.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["AUDIT_KEYS", "RolloutLog", "audit_file", "join_audit", "parse_rollout_log", "read_audit", "read_rollouts",
           "rollout_records", "step_file", "write_audit", "write_jsonl"]

_STEP_FILE = re.compile(r"step_(\d+)\.jsonl$")


def parse_rollout_log(value: str) -> int | None:
    """Rollouts kept per step: None = all, 0 = off, N for `sample:N`.

    >>> parse_rollout_log("all"), parse_rollout_log("off"), parse_rollout_log("sample:8")
    (None, 0, 8)
    """
    text = str(value).strip().lower()
    if text == "all":
        return None
    if text == "off":
        return 0
    head, _, count = text.partition(":")
    if head == "sample" and count.isdigit() and int(count) > 0:
        return int(count)
    raise ValueError(f"model.rollout_log must be 'all', 'off' or 'sample:N' with N >= 1, got {value!r}")


AUDIT_KEYS = ("audit_score", "audit_status", "audit_reply")


def step_file(root: str | Path, step: int) -> Path:
    return Path(root) / "rollouts" / f"step_{step:06d}.jsonl"


def audit_file(root: str | Path, step: int) -> Path:
    return Path(root) / "audit" / f"step_{step:06d}.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write `rows` atomically (temporary file, fsync, rename); returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_audit(root: str | Path, step: int, rows: list[dict]) -> Path:
    """Write `step`'s audit side file (module docstring): rows of `index` plus `AUDIT_KEYS`."""
    return write_jsonl(audit_file(root, step), rows)


def read_audit(root: str | Path, step: int) -> dict[int, dict]:
    """`step`'s audit grades by record index ({} when the step was not audited)."""
    path = audit_file(root, step)
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {int(r["index"]): {k: r.get(k) for k in AUDIT_KEYS} for r in rows}


def join_audit(records: list[dict], audit: dict[int, dict]) -> list[dict]:
    """`records` (one step's, in file order) with the audit grades of the audited ones added, in place."""
    for index, grades in audit.items():
        if 0 <= index < len(records):
            records[index].update(grades)
    return records


def rollout_records(problems: Sequence, rollouts: Sequence, grades: Sequence, rewards, valid, advantages,
                    step: int, decode: Callable[[list[int]], str], proof_of: Callable[[str], str | None]) -> list[dict]:
    """One record per rollout (see the module docstring). `problems[i // G]` is rollout i's prompt, `G` =
    `len(rollouts) // len(problems)`; `decode` turns prompt ids into text, `proof_of` gives the graded text."""
    group = len(rollouts) // max(len(problems), 1)
    prompts: dict[int, str] = {}
    records = []
    for i, (rollout, grade) in enumerate(zip(rollouts, grades, strict=True)):
        p = i // group
        problem = problems[p]
        if p not in prompts:
            prompts[p] = decode(list(rollout.prompt_ids))
        record: dict[str, Any] = {
            "step": step, "problem_id": problem.index, "source": problem.source, "group": p, "sample": i % group,
            "problem": problem.problem, "rubric": problem.rubric, "prompt": prompts[p], "completion": rollout.text,
            "proof": proof_of(rollout.text) if grade.status != "truncated" else None,
            "score": grade.score, "reward": float(rewards[i]), "valid": bool(valid[i]),
            "advantage": float(advantages[i]), "status": grade.status, "judge_reply": grade.reply,
            "judge_cached": grade.cached, "finish_reason": rollout.finish_reason,
            "prompt_tokens": len(rollout.prompt_ids), "completion_tokens": len(rollout.completion_ids),
            "policy_version": rollout.policy_version,
        }
        record.update(_rc_state(problem))
        records.append(record)
    return records


def _rc_state(problem) -> dict[str, Any]:
    """Stage 3: the RC state a prompt came from (cycle, replayed, the state's summary); {} for a policy prompt."""
    if problem.cycle is None:
        return {}
    return {"cycle": problem.cycle, "replayed": problem.replayed, "state": problem.summary}


class RolloutLog:
    """Chooses and writes a step's rollout records (see the module docstring).

    Args:
        mode: "all", "off" or "sample:N".
        seed: the draw of `sample:N` is seeded by (seed, step, rank), so a resumed run keeps the same records.
    """

    def __init__(self, mode: str = "all", seed: int = 0) -> None:
        self.keep = parse_rollout_log(mode)
        self.seed = seed

    @property
    def enabled(self) -> bool:
        return self.keep != 0

    def select(self, records: list[dict], step: int, rank: int = 0, world_size: int = 1) -> list[dict]:
        """The records this rank keeps: all, none, or a seeded draw of its share of N (ceil(N / world size))."""
        if self.keep is None or not records:
            return records if self.keep is None else []
        share = -(-self.keep // world_size)
        if share >= len(records):
            return records
        rng = random.Random(f"{self.seed}/{step}/{rank}")
        return [records[i] for i in sorted(rng.sample(range(len(records)), share))]

    @staticmethod
    def forget_from(root: str | Path, step: int) -> list[Path]:
        """Remove the files (and audit side files) of steps >= `step` (a resumed run redoes them); returns what was
        removed."""
        removed = []
        for folder in (Path(root) / "rollouts", Path(root) / "audit"):
            for path in sorted(folder.glob("step_*.jsonl")) if folder.is_dir() else []:
                match = _STEP_FILE.search(path.name)
                if match and int(match.group(1)) >= step:
                    path.unlink()
                    removed.append(path)
        return removed

    @staticmethod
    def write(root: str | Path, step: int, records: list[dict]) -> Path:
        """Write `step`'s records atomically (temporary file, fsync, rename); returns the file."""
        return write_jsonl(step_file(root, step), records)


def read_rollouts(root: str | Path, per_step: int | None = None) -> list[dict]:
    """Every record under `<root>/rollouts`, in step order, joined with its audit grades; with `per_step`, at most
    that many of each step (evenly spread over the step's records, so every group stays represented)."""
    folder = Path(root) / "rollouts"
    out: list[dict] = []
    files = (sorted(folder.glob("step_*.jsonl"), key=lambda p: int(_STEP_FILE.search(p.name).group(1)))
             if folder.is_dir() else [])
    for path in files:
        with open(path, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        join_audit(records, read_audit(root, int(_STEP_FILE.search(path.name).group(1))))
        if per_step and len(records) > per_step:
            records = ([records[round(k * (len(records) - 1) / (per_step - 1))] for k in range(per_step)]
                       if per_step > 1 else records[:1])
        out.extend(records)
    return out
