"""A persistent grade cache: the same proof, graded by the same judge and prompt, is not paid for twice.

Paper's choice: none (every rollout is graded). Ours: optional (`RubricJudge(cache_path=...)`), useful when
evaluations are rerun, when a run resumes, and for the short identical proofs a small policy repeats.

The key is the sha256 of the judge model, the prompt version (name + sha of the template text) and every field
substituted into the prompt (problem, rendered rubric or reference/guidelines, and the proof text actually graded,
after `</think>` extraction and any stripping). Only successful ("ok") grades are stored; a failure is never
cached, so a flaky judge is asked again next time. Note that with a sampling judge (temperature 1.0) a hit returns
the one sample that was stored.

Storage: one SQLite table in WAL mode; every write is its own transaction, so a crash never leaves a half-written
row, and several processes (DDP ranks) can share one file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qed_lightning.rewards.types import Grade

__all__ = ["GradeCache", "grade_cache_key"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grades (
    key TEXT PRIMARY KEY,
    score INTEGER NOT NULL,
    reward REAL,
    reply TEXT NOT NULL,
    latency_s REAL NOT NULL
)
"""


def grade_cache_key(model: str, prompt_version: str, fields: Mapping[str, str]) -> str:
    """sha256 over the judge model, the prompt version and the prompt's fields (JSON, so no two inputs collide).

    >>> a = grade_cache_key("m", "rubric_v1@0", {"proof": "a", "problem": "b"})
    >>> a == grade_cache_key("m", "rubric_v1@0", {"problem": "b", "proof": "a"}), len(a)
    (True, 64)
    """
    payload = json.dumps([model, prompt_version, sorted(fields.items())], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _retry_locked(statement, attempts: int = 200) -> None:
    """Run a set-up statement that SQLite may refuse with "database is locked" while another process (another
    training rank sharing the cache file) sets it up at the same moment; switching to WAL ignores the busy timeout."""
    for attempt in range(attempts):
        try:
            statement()
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(min(0.01 * (attempt + 1), 0.2))


class GradeCache:
    """Maps a grade key to the stored "ok" `Grade`; `get` returns it with `cached=True` (and latency 0)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=NORMAL")
            _retry_locked(lambda: conn.execute(_SCHEMA))
            self._conn = conn
        return self._conn

    def get(self, key: str) -> Grade | None:
        with self._lock:
            row = self._connection().execute("SELECT score, reward, reply FROM grades WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        score, reward, reply = row
        return Grade(score=score, reward=reward, status="ok", reply=reply, latency_s=0.0, cached=True)

    def put(self, key: str, grade: Grade) -> bool:
        """Store an "ok" grade; anything else is not stored (returns False)."""
        if grade.status != "ok" or grade.score is None:
            return False
        with self._lock:
            # Autocommit mode: a single statement is its own transaction, all or nothing.
            self._connection().execute(
                "INSERT OR REPLACE INTO grades (key, score, reward, reply, latency_s) VALUES (?, ?, ?, ?, ?)",
                (key, grade.score, grade.reward, grade.reply, grade.latency_s),
            )
        return True

    def __len__(self) -> int:
        with self._lock:
            return self._connection().execute("SELECT COUNT(*) FROM grades").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"GradeCache({str(self.path)!r})"
