"""One self-contained HTML page from loaded runs: the page template, its style and script (under `assets/`, packaged)
and the runs' data as JSON, all inline. No server and no network: the page's Content-Security-Policy forbids any
load from outside it, so what is in the file is all it shows.

The data sits in three `<script type="application/json">` elements, parsed separately by the page: `qed-data` (title,
warnings, each run's name, config, summary), `qed-metrics` (the curves) and `qed-rollouts` (the records). A page whose
rollouts cannot be read still draws its curves and says why the rollouts are missing. The page's script is the
concatenation of `assets/report*.js` in `SCRIPTS` order (data and helpers, charts, rollout browser, the rest), so each
stays small. KaTeX (MIT, `assets/katex.min.*`, license in `assets/KATEX_LICENSE`, fonts inlined as data URIs) renders
math offline; the page has a toggle back to the LaTeX source.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["SCRIPTS", "fixed_size", "render_report", "write_report"]

#: the page's own script, in load order
SCRIPTS = ("report_base.js", "report_charts.js", "report_browser.js", "report.js")
_RUN_FIELDS = ("name", "kind", "path", "config", "summary", "per_problem", "loss_kind", "bounds")


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


def _json_for_script(payload: Any) -> str:
    """JSON safe inside a `<script>` element: every `<` escaped, so no text (a proof that writes `</script>`) can end
    the element early; `\\u003c` is the same character to the JSON parser."""
    return json.dumps(_finite(payload), ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")


def _page(title: str) -> str:
    """The page with its code and style in place and the three data placeholders left."""
    page = _asset("report.html")
    for placeholder, value in (("__TITLE__", _escape(title)), ("__CSS__", _asset("report.css")),
                               ("__KATEX_CSS__", _asset("katex.min.css")), ("__KATEX_JS__", _asset("katex.min.js")),
                               ("__JS__", "\n".join(_asset(name) for name in SCRIPTS))):
        page = page.replace(placeholder, value, 1)
    return page


def fixed_size(runs: list[dict[str, Any]], title: str) -> int:
    """Bytes of the page without its rollout records: what a size bound has to leave for the code and the curves."""
    return len(render_report([{**run, "rollouts": []} for run in runs], title).encode("utf-8"))


def render_report(runs: list[dict[str, Any]], title: str = "qed-lightning report",
                  warnings: list[str] | None = None) -> str:
    """The page's HTML text for `runs` (each from `qed_lightning.report.load_run`); `warnings` shown on top."""
    data = {"title": title, "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "warnings": list(warnings or []), "runs": [{k: run[k] for k in _RUN_FIELDS if k in run} for run in runs]}
    metrics = [run.get("metrics") or {} for run in runs]
    rollouts = [run.get("rollouts") or [] for run in runs]
    page = _page(title)
    # the data last, each placeholder once: a run's own text can never be mistaken for a placeholder
    head, _, rest = page.partition("__DATA__")
    middle, _, rest = rest.partition("__METRICS__")
    middle2, _, tail = rest.partition("__ROLLOUTS__")
    return "".join([head, _json_for_script(data), middle, _json_for_script(metrics), middle2,
                    _json_for_script(rollouts), tail])


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_report(runs: list[dict[str, Any]], out: str | Path, title: str = "qed-lightning report",
                 warnings: list[str] | None = None) -> Path:
    """Write the page to `out` (parents created); returns its path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(runs, title, warnings), encoding="utf-8")
    return path
