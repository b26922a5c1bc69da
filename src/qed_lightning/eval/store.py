"""Resumable evaluation bookkeeping: what is generated, what is graded, and whether a folder belongs to this run.

An evaluation folder holds
- `generations.jsonl`: one record per generated sample, appended and flushed as soon as its generation call returns;
- `samples.jsonl`: one record per *graded* sample (the per-sample report), appended and flushed after grading;
- `manifest.json`: per scaffold name, the settings that determine its samples (model, benchmark, sampling, judge...).
A sample is keyed by (problem id, sample index, scaffold name). On restart, graded keys are skipped, generated but
ungraded keys are graded without regenerating, and the judge's grade cache answers grades that were paid for but not
yet written. The last record of a key wins, so a judge failure that is regraded later is superseded. A crash can
leave a torn last line; `JsonlLog` cuts it off before appending, so one bad line never spreads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["JsonlLog", "SampleKey", "SampleStore", "check_manifest", "sample_key"]

log = logging.getLogger(__name__)

SampleKey = tuple[str, int, str]
FAILED = ("error", "parse_fail", "incomplete")


def sample_key(record: dict[str, Any]) -> SampleKey:
    return (str(record["problem_id"]), int(record["sample"]), str(record["scaffold"]))


class JsonlLog:
    """An append-only JSON Lines file: every `append` is written and flushed to disk before it returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """Every complete record; a torn (unterminated or unparsable) last line is cut from the file."""
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().split(b"\n")
        records, good_bytes = [], 0
        for i, line in enumerate(lines):
            try:
                record = json.loads(line) if line.strip() else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = False
            terminated = i < len(lines) - 1  # the part after the last newline was never finished
            if line.strip() and (record is False or not terminated):
                if any(rest.strip() for rest in lines[i + 1:]):
                    raise ValueError(f"{self.path} line {i + 1} is not valid JSON; repair or delete that line.")
                self._truncate(good_bytes, i + 1)
                break
            good_bytes += len(line) + 1
            if record:
                records.append(record)
        return records

    def _truncate(self, size: int, lineno: int) -> None:
        log.warning("%s: line %d is incomplete (an interrupted write); cutting it off and resuming", self.path, lineno)
        with open(self.path, "r+b") as fh:
            fh.truncate(size)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class SampleStore:
    """The generations and graded samples of one evaluation folder (see the module docstring)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.dir = Path(output_dir)
        self.generations = JsonlLog(self.dir / "generations.jsonl")
        self.samples = JsonlLog(self.dir / "samples.jsonl")

    def graded(self) -> dict[SampleKey, dict[str, Any]]:
        """The latest graded record of every key."""
        return {sample_key(r): r for r in self.samples.read()}

    def generated(self) -> dict[SampleKey, dict[str, Any]]:
        """The latest generation record of every key."""
        return {sample_key(r): r for r in self.generations.read()}

    def plan(self, wanted: list[SampleKey], judge: str,
             regrade_failures: bool = True) -> tuple[list[SampleKey], list[dict[str, Any]]]:
        """Split `wanted` keys into (keys to generate, generation records to grade); finished keys are in neither.

        A key is finished when its latest graded record was graded by `judge` (records carry the judge's id), unless
        that grade was a judge failure and `regrade_failures` is on; then it is graded again from its generation.
        """
        graded, generated = self.graded(), self.generated()
        to_generate, to_grade = [], []
        for key in wanted:
            record = graded.get(key)
            finished = record is not None and record.get("judge") == judge
            if finished and not (regrade_failures and record.get("status") in FAILED):
                continue
            if key in generated:
                to_grade.append(generated[key])
            else:
                to_generate.append(key)
        return to_generate, to_grade


def check_manifest(output_dir: str | Path, scaffold: str, settings: dict[str, Any]) -> None:
    """Record `settings` for `scaffold` in `manifest.json`, or refuse when the folder holds different ones."""
    path = Path(output_dir) / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    settings = json.loads(json.dumps(settings, default=str))  # the JSON form, as it would be read back
    old = manifest.get(scaffold)
    if old is not None and old != settings:
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ValueError(
            f"{path}: the samples of scaffold {scaffold!r} in this folder were made with other settings "
            f"(changed: {', '.join(changed)}), so they cannot be resumed. Set `output_dir` to a new folder, give the "
            "scaffold another `name`, or delete the folder to start over."
        )
    if old is None:
        manifest[scaffold] = settings
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
