"""One self-contained HTML page from loaded runs: the page template, its style and script (under `assets/`, packaged)
and the runs' data as JSON, all inline. No server and no network: the page's Content-Security-Policy forbids any
load from outside it, so what is in the file is all it shows.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["render_report", "write_report"]


def _asset(name: str) -> str:
    return (resources.files(__package__) / "assets" / name).read_text(encoding="utf-8")


def _finite(value: Any) -> Any:
    """`value` with non-finite floats as None (JSON has no NaN; the page shows None as a blank)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_for_script(payload: dict[str, Any]) -> str:
    """JSON safe inside a `<script>` element: every `<` escaped, so no text (a proof that writes `</script>`) can end
    the element early; `\\u003c` is the same character to the JSON parser."""
    return json.dumps(_finite(payload), ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")


def render_report(runs: list[dict[str, Any]], title: str = "qed-lightning report") -> str:
    """The page's HTML text for `runs` (each from `qed_lightning.report.load_run`)."""
    payload = {"title": title, "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "runs": runs}
    page = _asset("report.html")
    # the data last: a run's own text can never be mistaken for a placeholder
    for placeholder, value in (("__TITLE__", _escape(title)), ("__CSS__", _asset("report.css")), ("__JS__", _asset("report.js"))):
        page = page.replace(placeholder, value, 1)
    return page.replace("__DATA__", _json_for_script(payload), 1)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_report(runs: list[dict[str, Any]], out: str | Path, title: str = "qed-lightning report") -> Path:
    """Write the page to `out` (parents created); returns its path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(runs, title), encoding="utf-8")
    return path
