"""Load dataset rows from a hub id or a local file, with errors that say what to fix.

Our users pass hub ids (`lm-provers/FineProofs-SFT`); our machines have no hub access, so every loader also takes a
local `.json`/`.jsonl`/`.parquet` file with the same columns. `columns` maps our field names onto the dataset's
column names (e.g. `{"problem": "Problem", "solution": "Solution"}` for a benchmark with capitalised headers).
Validation happens here, before any model loads, and names the file, row and column of every problem found.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
MAX_LISTED_ERRORS = 20


class DataError(ValueError):
    """Bad input data: the message names the file, row and column and says how to fix it."""


def is_local(source: str) -> bool:
    return Path(source).suffix in LOCAL_SUFFIXES or Path(source).exists()


def _scan_jsonl(path: Path) -> None:
    """Find the first line of a JSON Lines file that is not UTF-8 or not a JSON object (error path only)."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; it must hold one JSON object per line.")
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path} line {lineno}: not valid UTF-8 ({err.reason} at byte {err.start}); re-encode the file as UTF-8.") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {lineno}: not valid JSON ({err.msg} at column {err.colno}).") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object per line, got {type(obj).__name__}.")


def _load_local(path: Path) -> list[dict[str, Any]]:
    import datasets

    if not path.exists():
        raise DataError(f"{path}: no such file. Point the data `path` at an existing .jsonl/.json/.parquet file or a hub id.")
    builder = LOCAL_SUFFIXES.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet.")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty.")
    if path.suffix == ".jsonl":
        _scan_jsonl(path)  # cheap, and gives line numbers that the datasets loader cannot
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parse errors in several types
        raise DataError(f"{path}: could not be read as {builder}: {err}") from err
    if len(ds) == 0:
        raise DataError(f"{path}: the file holds no rows.")
    return ds.to_list()


def _load_hub(source: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(source, subset, split=split)
    except Exception as err:
        offline = "offline" in type(err).__name__.lower() or "offline" in str(err).lower()
        reason = "the hub is unreachable (offline mode)" if offline else f"{type(err).__name__}: {err}"
        raise DataError(
            f"Could not load dataset {source!r} (subset={subset!r}, split={split!r}): {reason}. "
            "On a machine without hub access, download it elsewhere and set the data `path` to a local "
            ".jsonl/.json/.parquet file with the same columns (for example data/samples/*.jsonl)."
        ) from err
    return ds.to_list()


def load_rows(source: str, *, subset: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """Return the rows of a local file or a hub dataset as plain dicts."""
    if is_local(source):
        return _load_local(Path(source))
    return _load_hub(source, subset, split)


Check = Callable[[Any], str | None]


def validate_rows(
    rows: list[dict[str, Any]],
    checks: Mapping[str, Check],
    *,
    where: str,
    columns: Mapping[str, str] | None = None,
) -> None:
    """Run `checks[field](value)` on every row; raise one DataError listing every problem (up to 20).

    A check returns None when the value is fine, else a short description of what is wrong. `columns` maps a field
    onto the dataset's column name, so the message names the column the user sees.
    """
    columns = dict(columns or {})
    errors: list[str] = []
    if rows:
        missing = [columns.get(f, f) for f in checks if columns.get(f, f) not in rows[0]]
        if missing:
            have = sorted(rows[0])
            raise DataError(
                f"{where}: missing column(s) {missing}; the file has {have}. Rename the columns or map them with "
                f"`columns: {{our_field: your_column}}` in the data config."
            )
    for index, row in enumerate(rows):
        for field, check in checks.items():
            column = columns.get(field, field)
            problem = check(row.get(column)) if column in row else "missing"
            if problem:
                errors.append(f"row {index}, column {column!r}: {problem}")
    if errors:
        shown = "\n  ".join(errors[:MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
        raise DataError(f"{where}: {len(errors)} malformed value(s) (rows counted from 0):\n  {shown}{more}")


def remap(row: Mapping[str, Any], columns: Mapping[str, str] | None, fields: list[str]) -> dict[str, Any]:
    """Pick our `fields` out of a row through the column mapping."""
    columns = columns or {}
    return {f: row.get(columns.get(f, f)) for f in fields}


# Reusable checks ---------------------------------------------------------------------------------------------------


def nonempty_str(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not value.strip():
        return "empty string"
    return None


def chat_messages(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of {{role, content}} messages, got {type(value).__name__}"
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            return f"message {i} is not a {{role: str, content: str}} dict"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        return "no non-empty assistant message to train on"
    return None
