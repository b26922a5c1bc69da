"""A persistent grade cache: the same proof, graded by the same judge and prompt, is not paid for twice.

Paper's choice: none (every rollout is graded). Ours: optional (`RubricJudge(cache_path=...)`), useful when
evaluations are rerun, when a run resumes, and for the short identical proofs a small policy repeats.

The key is the sha256 of the judge model, the prompt version (name + sha of the template text) and every field
substituted into the prompt (problem, rendered rubric or reference/guidelines, and the proof text actually graded,
after `</think>` extraction and any stripping). Only successful ("ok") grades are stored; a failure is never
cached, so a flaky judge is asked again next time. Note that with a sampling judge (temperature 1.0) a hit returns
the one sample that was stored.

Storage, safe across the nodes of a multi-node run: `cache_path` names the cache, and every process writes only its
own shard next to it, `<stem>.rank<R>.jsonl` (R = its global rank, `qed_lightning.parallel.process_ranks`; e.g.
`runs/rl/grades.rank3.jsonl` for `cache_path: runs/rl/grades.sqlite`): one JSON object per grade, appended as one
line and flushed. No file has two writers, so nothing relies on file locks, which network file systems do not honour
reliably across hosts (the SQLite file in WAL mode that all ranks shared before needs shared memory, which does not
work over a network file system at all). When a cache opens (every start and resume), it reads every shard of the
cache into memory, merged by key, so grades written by any rank of any earlier run are reused; a last line torn by a
crash is skipped, and a grade whose line was lost is simply asked again. A SQLite cache file left at `cache_path`
by an older version is read too (read-only). Within one run a rank sees its own new grades, not those other ranks
write meanwhile: two ranks grading the same proof in the same step may both pay for it, and the merge keeps one.
Two separate jobs must not write one cache with the same ranks at the same time.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from qed_lightning.parallel import process_ranks
from qed_lightning.rewards.types import Grade

__all__ = ["GradeCache", "grade_cache_key"]


def grade_cache_key(model: str, prompt_version: str, fields: Mapping[str, str]) -> str:
    """sha256 over the judge model, the prompt version and the prompt's fields (JSON, so no two inputs collide).

    >>> a = grade_cache_key("m", "rubric_v1@0", {"proof": "a", "problem": "b"})
    >>> a == grade_cache_key("m", "rubric_v1@0", {"problem": "b", "proof": "a"}), len(a)
    (True, 64)
    """
    payload = json.dumps([model, prompt_version, sorted(fields.items())], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def parse_shard(text: str) -> dict[str, dict[str, Any]]:
    """The grades of one shard's text, by key; lines that are not a complete record (a crash's torn last line) are
    skipped.

    >>> rows = parse_shard('{"key": "a", "score": 3, "reward": 0.4, "reply": "r"}\\n{"key": "b", "sco')
    >>> list(rows), rows["a"]["score"]
    (['a'], 3)
    """
    rows: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and {"key", "score", "reward", "reply"} <= row.keys():
            rows[row["key"]] = row
    return rows


def _legacy_sqlite(path: Path) -> dict[str, dict[str, Any]]:
    """The grades of a SQLite cache written by an older version at `path` (read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT key, score, reward, reply FROM grades").fetchall()
    except sqlite3.DatabaseError:
        return {}
    finally:
        conn.close()
    return {k: {"key": k, "score": s, "reward": r, "reply": reply} for k, s, r, reply in rows}


class GradeCache:
    """Maps a grade key to the stored "ok" `Grade`; `get` returns it with `cached=True` (and latency 0).

    Args:
        path: the cache's name (see the module docstring for the shard files next to it).
        writer: this process's shard name; None = `rank<R>` of `process_ranks()`, resolved at first use (after the
            trainer's launcher has started the process group).
    """

    def __init__(self, path: str | Path, writer: str | None = None):
        self.path = Path(path).expanduser()
        self.writer = writer
        self._configured_writer = writer  # a copy in another process resolves its own rank
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, Any]] | None = None
        self._file: IO[str] | None = None

    def shard(self, writer: str) -> Path:
        return self.path.with_name(f"{self.path.stem}.{writer}.jsonl")

    def shards(self) -> list[Path]:
        """Every shard of this cache on disk, in name order."""
        return sorted(self.path.parent.glob(f"{self.path.stem}.*.jsonl"))

    def _loaded(self) -> dict[str, dict[str, Any]]:
        if self._rows is None:
            rows = _legacy_sqlite(self.path) if self.path.is_file() else {}
            for shard in self.shards():
                rows.update(parse_shard(shard.read_text(encoding="utf-8", errors="replace")))
            self._rows = rows
        return self._rows

    def get(self, key: str) -> Grade | None:
        with self._lock:
            row = self._loaded().get(key)
        if row is None:
            return None
        return Grade(score=row["score"], reward=row["reward"], status="ok", reply=row["reply"], latency_s=0.0,
                     cached=True)

    def put(self, key: str, grade: Grade) -> bool:
        """Store an "ok" grade; anything else is not stored (returns False)."""
        if grade.status != "ok" or grade.score is None:
            return False
        row = {"key": key, "score": grade.score, "reward": grade.reward, "reply": grade.reply,
               "latency_s": grade.latency_s}
        with self._lock:
            self._loaded()[key] = row
            self._append(json.dumps(row, ensure_ascii=False) + "\n")
        return True

    def _append(self, line: str) -> None:
        """One line per grade, in one write, flushed: a crash loses at most the grade being written."""
        if self._file is None:
            self.writer = self.writer or f"rank{process_ranks().rank}"
            shard = self.shard(self.writer)
            shard.parent.mkdir(parents=True, exist_ok=True)
            torn = shard.exists() and shard.stat().st_size > 0 and not shard.read_bytes().endswith(b"\n")
            self._file = open(shard, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run
            if torn:  # a crash's partial line: start the next record on a line of its own
                self._file.write("\n")
        self._file.write(line)
        self._file.flush()

    def __len__(self) -> int:
        with self._lock:
            return len(self._loaded())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._rows = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "writer": self._configured_writer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state.get("writer"))

    def __repr__(self) -> str:
        return f"GradeCache({str(self.path)!r})"
