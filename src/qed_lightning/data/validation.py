"""Row checks, and what a run does with the rows that fail them (`data.on_invalid_row`, `data.max_invalid_fraction`).

Every row is checked, never only up to the first failure, and every finding names the file, the 1-based line (the
row number for Parquet files and hub datasets), the column and what is wrong. Then, by `RowPolicy`:
- `error` (default, and what the paper configs use): one `DataError` lists every rejected row, before any model loads;
- `skip`: the rejected rows are left out and written to `<run>/data_rejects.jsonl` (file, line, column, reason, the
  row), their count is logged, and the run refuses to start only when more than `max_invalid_fraction` of the rows
  were rejected (a wrong `columns` mapping or the wrong file should stop a run, not train it on what is left).
Columns a row does not use are ignored; a column that no row has is reported once, with the columns the file has.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qed_lightning.data.loading import MAX_LISTED_ERRORS, DataError, Reject, Table

__all__ = ["Check", "RowPolicy", "chat_messages", "find_rejects", "format_rejects", "nonempty_str", "remap",
           "validate_rows", "write_jsonl"]

log = logging.getLogger(__name__)

Check = Callable[[Any], str | None]
REJECTS_FILE = "data_rejects.jsonl"


def find_rejects(table: Table, checks: Mapping[str, Check], columns: Mapping[str, str] | None = None,
                 required: bool = True, unreadable: bool = True) -> list[Reject]:
    """Run `checks[field](value)` on every readable row; return the unreadable lines (unless `unreadable=False`, for
    a second pass over the same table) and every failed check, in file order (a row with several problems appears
    once per problem).

    A check returns None when the value is fine, else a short description of what is wrong. `columns` maps a field
    onto the file's column name, so findings name the column the user sees. A row without the column is reported
    as "missing column 'x'", a JSON null as "null value", and a column that no row has raises at once; with
    `required=False` (optional columns) a missing or null value is fine and only present values are checked.
    """
    columns = dict(columns or {})
    named = {field: columns.get(field, field) for field in checks}
    absent = [c for c in named.values() if table.rows and not any(c in row for row in table.rows)]
    if absent and required:
        have = sorted({k for row in table.rows for k in row})
        raise DataError(f"{table.where}: missing column(s) {absent}; the file has {have}. Rename the columns or map "
                        "them with `columns: {our_field: your_column}` in the data config.")
    rejects = list(table.unreadable) if unreadable else []
    for index, row in enumerate(table.rows):
        for field, check in checks.items():
            column = named[field]
            if not required and row.get(column) is None:
                continue
            if column not in row:
                problem = f"missing column {column!r}"
            elif row[column] is None:
                problem = "null value"
            else:
                problem = check(row[column])
            if problem:
                rejects.append(table.reject(index, column, problem))
    return sorted(rejects, key=lambda r: r.position)


def format_rejects(where: str, rejects: list[Reject], total: int, hint: str = "") -> str:
    """One message naming every rejected row (up to `MAX_LISTED_ERRORS`) by its line (or row) and column."""
    unit = rejects[0].unit if rejects else "line"
    rows = len({r.position for r in rejects})
    shown = "\n  ".join(r.describe() for r in rejects[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(rejects) - MAX_LISTED_ERRORS} more" if len(rejects) > MAX_LISTED_ERRORS else ""
    counted = "lines of the file" if unit == "line" else "rows counted from 1"
    return f"{where}: {rows} of {total} rows are invalid ({counted}):\n  {shown}{more}{hint}"


def validate_rows(table: Table, checks: Mapping[str, Check], columns: Mapping[str, str] | None = None,
                  required: bool = True) -> None:
    """Raise one `DataError` naming every unreadable line and failed check (the `error` policy; evaluation data)."""
    rejects = find_rejects(table, checks, columns, required)
    if rejects:
        raise DataError(format_rejects(table.where, rejects, table.total))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write records one per line (ASCII JSON, so a row with a lone surrogate is written escaped, as it was read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, default=str) + "\n")


@dataclass(frozen=True)
class RowPolicy:
    """What a data module does with rejected rows; see the module docstring.

    Args:
        on_invalid_row: "error" (refuse the data, naming every bad row) or "skip" (train on the valid rows).
        max_invalid_fraction: with "skip", the largest share of rejected rows a run accepts.
    """

    on_invalid_row: Literal["error", "skip"] = "error"
    max_invalid_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            raise ValueError(f"data.max_invalid_fraction must be in [0, 1], got {self.max_invalid_fraction}")

    def apply(self, where: str, rejects: list[Reject], total: int, run_dir: Path | None) -> set[int]:
        """Raise, or write the rejects to `<run_dir>/data_rejects.jsonl` and return the rejected positions."""
        if not rejects:
            return set()
        positions = {r.position for r in rejects}
        fix = (f"\nFix these rows, or set data.on_invalid_row=skip to train on the other {total - len(positions)} rows "
               f"(the rejects are written to <run>/{REJECTS_FILE}).")
        if self.on_invalid_row == "error":
            raise DataError(format_rejects(where, rejects, total, fix))
        share = len(positions) / max(total, 1)
        if share > self.max_invalid_fraction:
            hint = (f"\n{share:.1%} of the rows are invalid, more than data.max_invalid_fraction="
                    f"{self.max_invalid_fraction}: check the file and the `columns` mapping, or raise the limit.")
            raise DataError(format_rejects(where, rejects, total, hint))
        if run_dir is not None:
            write_jsonl(run_dir / REJECTS_FILE, [r.record() for r in rejects])
        log.warning("%s: skipped %d of %d rows (data.on_invalid_row=skip); the reasons are in %s", where,
                    len(positions), total, run_dir / REJECTS_FILE if run_dir is not None else "the log above")
        for reject in rejects[:MAX_LISTED_ERRORS]:
            log.warning("  %s", reject.describe())
        return positions


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
