"""Load dataset rows from a hub id or a local file, locating every line that cannot be read.

Our users pass hub ids (`lm-provers/FineProofs-SFT`); our machines have no hub access, so every loader also takes a
local `.jsonl`/`.json`/`.parquet` file with the same columns. `columns` maps our field names onto the dataset's
column names (e.g. `{"problem": "Problem"}`); row checks live in `validation.py`.

JSON Lines (and `.json` files) are read here, line by line, rather than by `datasets`: that way every row keeps the
1-based line number an editor shows, a missing key stays missing (the `datasets` JSON builder fills it with None),
and each unreadable line is found and reported, not only the first. The scan catches what `json` lets through or
reports badly: bytes that are not UTF-8 (with the character column), a lone surrogate escape such as `\\ud800`
(valid JSON, but not Unicode text: tokenizers and UTF-8 writers fail on it later), a line that is JSON but not an
object. Parquet files and hub datasets go through `datasets`; their rows are numbered from 1. A UTF-8 byte-order
mark at the start of a file (Windows editors write one) is dropped before reading, so row 1 stays valid JSON.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["ConfigError", "DataError", "Reject", "Table", "exit_on_data_error", "is_local", "load_rows", "load_table"]

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
MAX_LISTED_ERRORS = 30
UTF8_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_CHAR = re.compile("[\ud800-\udfff]")


class DataError(ValueError):
    """Bad input data: the message names the file, line and column and says how to fix it."""


class ConfigError(ValueError):
    """A config value or a run folder that cannot work: one line naming the key (`model.group_size`) or folder, what
    it got, and why (or what to do)."""


DEBUG_ENV = "QED_DEBUG"


def debug_requested(argv: list[str]) -> bool:
    """Whether the user asked for tracebacks (`--debug` on the command line, which is removed, or QED_DEBUG=1)."""
    flag = "--debug" in argv
    while "--debug" in argv:
        argv.remove("--debug")
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextmanager
def exit_on_data_error(prog: str, debug: bool = False) -> Iterator[None]:
    """In a command-line entry point: print a `DataError`'s or a `ConfigError`'s message without a traceback and exit
    with status 2 (the status of a usage error); with `debug`, let it propagate with its traceback. A one-line
    message stays one line: the hint about `--debug` is appended to its last line."""
    try:
        yield
    except (DataError, ConfigError) as err:
        if debug:
            raise
        sys.stderr.write(f"{prog}: error: {err} (run with --debug or {DEBUG_ENV}=1 for the traceback)\n")
        raise SystemExit(2) from None


@dataclass(frozen=True)
class Reject:
    """One row left out (or refused): where it is, which column, why, and the row itself (or the raw line)."""

    where: str
    unit: Literal["line", "row"]
    position: int  # 1-based line of a JSON Lines file, else 1-based row number
    column: str | None
    reason: str
    row: Any = None

    def describe(self) -> str:
        column = f", column {self.column!r}" if self.column else ""
        return f"{self.unit} {self.position}{column}: {self.reason}"

    def record(self) -> dict[str, Any]:
        """The `data_rejects.jsonl` record: file, 1-based line (row number for non-line sources), column, reason,
        row."""
        return {"file": self.where, "line": self.position, "column": self.column, "reason": self.reason,
                "row": self.row}


@dataclass
class Table:
    """A source's readable rows, the line (or row number) of each, and the lines that could not be read."""

    where: str
    unit: Literal["line", "row"]
    rows: list[dict[str, Any]]
    positions: list[int]
    unreadable: list[Reject] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.unreadable)

    def reject(self, index: int, column: str | None, reason: str) -> Reject:
        return Reject(self.where, self.unit, self.positions[index], column, reason, self.rows[index])


def is_local(source: str) -> bool:
    return Path(source).suffix in LOCAL_SUFFIXES or Path(source).exists()


# -- the Unicode scan ------------------------------------------------------------------------------------------------


def lone_surrogate(text: str) -> tuple[int, str] | None:
    """(1-based character column, escape) of the first `\\uD800`..`\\uDFFF` escape in JSON text that is not one half
    of a high-low pair, or None. Escaped backslashes (`\\\\ud800`) are text, not escapes.

    >>> lone_surrogate('{"a": "x\\\\ud800y"}')
    (9, '\\\\ud800')
    >>> lone_surrogate('{"a": "\\\\ud83d\\\\ude00"}') is None, lone_surrogate('{"a": "\\\\\\\\ud800"}') is None
    (True, True)
    >>> lone_surrogate('{"a": "\\\\ude00"}')
    (8, '\\\\ude00')
    """
    pending: tuple[int, str] | None = None  # a high surrogate waiting for its low half
    i = 0
    while i < len(text):
        if text[i] != "\\" or text[i + 1:i + 2] != "u":
            if pending is not None:
                return pending
            i += 2 if text[i] == "\\" else 1
            continue
        escape, code = text[i:i + 6], int(text[i + 2:i + 6], 16)
        if 0xD800 <= code <= 0xDBFF:
            if pending is not None:
                return pending
            pending = (i + 1, escape)
        elif 0xDC00 <= code <= 0xDFFF:
            if pending is None:
                return i + 1, escape
            pending = None
        elif pending is not None:
            return pending
        i += 6
    return pending


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE_CHAR.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _surrogate_column(obj: dict[str, Any]) -> str | None:
    return next((str(k) for k, v in obj.items() if _has_surrogate(k) or _has_surrogate(v)), None)


def _read_line(line: bytes) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(object, None, None) for a good line, else (object or None, column or None, why it cannot be used)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        column = len(line[:err.start].decode("utf-8", "replace")) + 1
        return None, None, f"not valid UTF-8 ({err.reason}) at character {column}; re-encode the file as UTF-8"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, None, f"not valid JSON ({err.msg} at character {err.colno})"
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", type(None): "null"}.get(type(obj), f"a {type(obj).__name__}")
        return None, None, f"expected a JSON object per line, got {kind}"
    if _SURROGATE_ESCAPE.search(text) and _has_surrogate(obj):
        column, escape = lone_surrogate(text) or (0, "")
        return obj, _surrogate_column(obj), (f"lone surrogate {escape} at character {column}: not valid Unicode text; "
                                             "remove it or write the intended character")
    return obj, None, None


# -- readers ---------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path, raw: bytes) -> Table:
    table = Table(str(path), "line", [], [])
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        obj, column, problem = _read_line(line)
        if problem is None:
            table.rows.append(obj)
            table.positions.append(lineno)
        else:
            shown = obj if obj is not None else line.decode("utf-8", "replace")
            table.unreadable.append(Reject(str(path), "line", lineno, column, problem, shown))
    return table


def _read_json_array(path: Path, raw: bytes) -> Table:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 ({err.reason}); re-encode the file as UTF-8.") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: not valid JSON ({err.msg} at character {err.colno}).") from None
    table = Table(str(path), "row", [], [])
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            table.unreadable.append(Reject(str(path), "row", number, None, "expected a JSON object", item))
        elif _has_surrogate(item):
            table.unreadable.append(Reject(str(path), "row", number, _surrogate_column(item),
                                           "lone surrogate: not valid Unicode text", item))
        else:
            table.rows.append(item)
            table.positions.append(number)
    return table


def _load_local(path: Path) -> Table:
    if not path.exists():
        raise DataError(f"{path}: no such file. Point the data `path` at an existing .jsonl/.json/.parquet file "
                        "or a hub id.")
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet.")
    if path.suffix == ".parquet":
        import datasets

        try:
            rows = datasets.load_dataset("parquet", data_files=str(path), split="train").to_list()
        except Exception as err:  # datasets wraps parse errors in several types
            raise DataError(f"{path}: could not be read as parquet: {err}") from err
        return Table(str(path), "row", rows, list(range(1, len(rows) + 1)))
    raw = path.read_bytes().removeprefix(UTF8_BOM)
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; it must hold one JSON object per line.")
    if path.suffix == ".json" and raw.lstrip()[:1] == b"[":
        return _read_json_array(path, raw)
    return _read_jsonl(path, raw)


def _load_hub(source: str, subset: str | None, split: str) -> Table:
    import datasets

    try:
        rows = datasets.load_dataset(source, subset, split=split).to_list()
    except Exception as err:
        offline = "offline" in type(err).__name__.lower() or "offline" in str(err).lower()
        reason = "the hub is unreachable (offline mode)" if offline else f"{type(err).__name__}: {err}"
        raise DataError(
            f"Could not load dataset {source!r} (subset={subset!r}, split={split!r}): {reason}. "
            "On a machine without hub access, download it elsewhere and set the data `path` to a local "
            ".jsonl/.json/.parquet file with the same columns (for example data/samples/*.jsonl)."
        ) from err
    return Table(source, "row", rows, list(range(1, len(rows) + 1)))


def load_table(source: str, *, subset: str | None = None, split: str = "train") -> Table:
    """The rows of a local file or a hub dataset with their positions, and the lines that could not be read."""
    table = _load_local(Path(source)) if is_local(source) else _load_hub(source, subset, split)
    if not table.rows and not table.unreadable:
        raise DataError(f"{source}: the file holds no rows.")
    return table


def load_rows(source: str, *, subset: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """The rows of a local file or a hub dataset as plain dicts; one `DataError` lists every unreadable line."""
    table = load_table(source, subset=subset, split=split)
    if table.unreadable:
        listed = "\n  ".join(r.describe() for r in table.unreadable[:MAX_LISTED_ERRORS])
        raise DataError(f"{source}: {len(table.unreadable)} line(s) cannot be read:\n  {listed}")
    return table.rows
