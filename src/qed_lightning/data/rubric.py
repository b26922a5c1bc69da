"""Marking schemes: render a rubric for the judge prompt, and read how many points its checkpoints are worth (SPEC 2).

A FineProofs-RL rubric is markdown with three sections: *Checkpoints (7 pts total)*, *Zero-credit items* and
*Deductions*. When a problem admits parallel solution paths, the checkpoints come as chains ("Chain A", "Path 1",
"Approach (i)") that are scored by the best chain, never summed. A rubric may also arrive as a list of
`{title, points, description}` items (the paper's rendering: `# {title} ({points} points)\\nDescription: ...`).

Paper's choice: the rubric text is pasted into the judge prompt as is. Ours: the same (markdown is never rewritten),
plus `read_rubric`, which the data layer uses to reject rubrics whose checkpoints are read to a total other than 7.
The 5,227 FineProofs-RL rubrics were written by an LLM and vary in markup, and the judge reads a rubric as text, so a
rubric whose total we cannot read is *kept* (counted as unverified), never a reason to stop a run.

What `read_rubric` reads (every rule is a test in tests/unit/test_rubric_reading.py):
- the checkpoint section starts at a line that names "Checkpoints" (any heading level, bold, numbered, or bold and
  numbered as `**1. Checkpoints**`) and ends at the next heading that is not a chain, or at a "Zero-credit" /
  "Deductions" line;
- a checkpoint is a line of the section (a bullet, a numbered item or plain text) with a point count written
  `**2 pts**`, `(2 pts)`, `[2 points]`, `**(2 pts)**`, before or after the text, or bare (`2 pt.`, `- 2 pts:`) at the
  start of the line followed by `.`/`:`/a dash, or at its end after a colon or a dash; a number inside a sentence
  ("the 3 points are collinear", "meets the circle at 2 points.") is not a count;
- an item indented under a counted item is its breakdown and is not added again; a line starting with "Total" (e.g.
  `Total (max 7)`) is a summary, not an item;
- a line starting with "Chain X", "Path N" or "Approach (i)" (bold, heading or bullet) opens that chain (its own
  points, e.g. "(max 5 pts)", are a subtotal, not an item); any other bold-only line closes it. Total = common points
  plus the largest chain subtotal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RubricReading", "check_rubric", "read_rubric", "render_rubric", "rubric_total"]

REQUIRED_TOTAL = 7

_LEAD = r"^\s*(?:#{1,6}\s*)?(?:[-*+]\s+)?(?:\*\*|__)?\s*(?:\d+[.)]\s*)?(?:\*\*|__)?\s*"
_CHECKPOINT_START = re.compile(_LEAD + r"checkpoints?\b", re.IGNORECASE)
_SECTION_END = re.compile(_LEAD + r"(?:zero[\s-]*credit|deductions?)\b", re.IGNORECASE)
_HEADING = re.compile(r"^\s*#{1,6}\s")
_CHAIN = re.compile(_LEAD + r"(chain|path|approach)\s+\(?([A-Za-z]|\d+|[ivxIVX]+)\)?(?![A-Za-z0-9])", re.IGNORECASE)
_TOTAL_LINE = re.compile(_LEAD + r"total\b", re.IGNORECASE)
_BOLD_LINE = re.compile(r"^\s*(?:[-*+]\s+)?\*\*[^*]+\*\*\s*:?\s*$")
_MARKER = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
_POINTS = r"(\d+)\s*(?:pts?|points?)\.?"
_WRAPPED = re.compile(r"\*\*\s*[(\[]?\s*" + _POINTS + r"\s*[)\]]?\s*:?\s*\*\*|[(\[]\s*" + _POINTS + r"\s*[)\]]",
                      re.IGNORECASE)
# bare counts need a separator, so that "3 points are collinear" or "meets the circle at 2 points." is no count
_BARE_START = re.compile(r"^(\d+)\s*(?:pts?|points?)\s*[.:\-\u2013\u2014)]", re.IGNORECASE)
_BARE_END = re.compile(r"[:\-\u2013\u2014]\s*" + _POINTS + r"\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class RubricReading:
    """What `read_rubric` made of a rubric: its checkpoint total, or None with the reason it could not be read."""

    total: int | None
    why_unread: str = ""

    @property
    def verified(self) -> bool:
        return self.total is not None


def _render_item(item: Mapping, index: int) -> str:
    missing = [key for key in ("title", "points") if key not in item]
    if "description" not in item and "desc" not in item:
        missing.append("description (or desc)")
    if missing:
        raise ValueError(f"rubric item {index} lacks {', '.join(missing)}; got keys {sorted(item)}.")
    description = item["description"] if "description" in item else item["desc"]
    return f"# {item['title']} ({item['points']} points)\nDescription: {description}"


def render_rubric(rubric: str | list[dict]) -> str:
    """The marking scheme as the judge sees it: markdown as is (stripped), or list items rendered one per block.

    >>> print(render_rubric([{"title": "Setup", "points": 2, "description": "Defines f."},
    ...                      {"title": "Bound", "points": 5, "desc": "Proves f <= 1."}]))
    # Setup (2 points)
    Description: Defines f.
    <BLANKLINE>
    # Bound (5 points)
    Description: Proves f <= 1.
    """
    if isinstance(rubric, str):
        return rubric.strip()
    if isinstance(rubric, list):
        return "\n\n".join(_render_item(item, i) for i, item in enumerate(rubric))
    raise TypeError(
        f"a rubric is a markdown str or a list of {{title, points, description}} dicts, got {type(rubric).__name__}."
    )


def item_points(line: str) -> int | None:
    """The point count of one checkpoint line, or None when the line states none.

    >>> [item_points(s) for s in ["- **2 pts**: Factors.", "1. **(2 pts)** Factors.", "- Factors (2 pts)",
    ...                           "* [3 points] Bound", "- 2 pts: Bound", "2 pt. Bound", "- Bound - 1 pt",
    ...                           "- Shows the 3 points are collinear.", "- Meets the circle at 2 points.",
    ...                           "- **-1**: slip"]]
    [2, 2, 2, 3, 2, 2, 1, None, None, None]
    """
    text = _MARKER.sub("", line, count=1).strip()
    wrapped = _WRAPPED.search(text)
    if wrapped:
        return int(wrapped.group(1) or wrapped.group(2))
    bare = _BARE_START.match(text) or _BARE_END.search(text)
    return int(bare.group(1)) if bare else None


def _checkpoint_section(lines: list[str]) -> list[str] | None:
    start = next((i for i, line in enumerate(lines) if _CHECKPOINT_START.match(line)), None)
    if start is None:
        return None
    section = []
    for line in lines[start + 1:]:
        if (_SECTION_END.match(line) or _HEADING.match(line)) and not _CHAIN.match(line):
            break
        section.append(line)
    return section


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _sum_section(section: list[str]) -> tuple[int, dict[str, int], int]:
    """(common points, chain label -> subtotal, items counted)."""
    common, chains, current, counted = 0, {}, None, 0
    parent_indent: int | None = None  # indentation of the last counted item: deeper items are its breakdown
    for line in section:
        if not line.strip():
            continue
        chain = _CHAIN.match(line)
        if chain:
            current = f"{chain.group(1).lower()} {chain.group(2).upper()}"
            chains.setdefault(current, 0)
            parent_indent = None
            continue
        if _TOTAL_LINE.match(line):
            continue
        points = item_points(line)
        if points is None:
            if _BOLD_LINE.match(line):
                current, parent_indent = None, None
            continue
        if parent_indent is not None and _indent(line) > parent_indent:
            continue
        parent_indent, counted = _indent(line), counted + 1
        if current is None:
            common += points
        else:
            chains[current] += points
    return common, chains, counted


def read_rubric(rubric_markdown: str) -> RubricReading:
    """The points of a markdown rubric's checkpoints (common items plus the best chain), or why they cannot be read.

    >>> read_rubric("## Checkpoints (7 pts total)\\n- **3 pts**: a\\n- **4 pts**: b\\n"
    ...             "## Deductions\\n- **1 pt**: x").total
    7
    >>> read_rubric('''**1. Checkpoints**
    ... 1. **(1 pt)** common setup
    ... **Path 1 (induction)**
    ... - step (4 pts)
    ... - finish (2 pts)
    ... **Path 2 (algebra)**
    ... - identity [5 points]''').total  # 1 + max(4 + 2, 5)
    7
    >>> read_rubric("Award 7 points for a correct proof.")
    RubricReading(total=None, why_unread="no line names a 'Checkpoints' section")
    """
    section = _checkpoint_section(rubric_markdown.splitlines())
    if section is None:
        return RubricReading(None, "no line names a 'Checkpoints' section")
    common, chains, counted = _sum_section(section)
    if counted == 0:
        return RubricReading(None, "the checkpoint section has no item with a point count")
    return RubricReading(common + max(chains.values(), default=0))


def rubric_total(rubric_markdown: str) -> int | None:
    """`read_rubric(...).total`: the checkpoint points, or None when they cannot be read."""
    return read_rubric(rubric_markdown).total


def _list_total(items: list[Any]) -> tuple[int | None, str | None]:
    try:
        render_rubric(items)
        return sum(int(item["points"]) for item in items), None
    except (ValueError, TypeError, KeyError) as err:
        return None, str(err)


def check_rubric(value: Any) -> str | None:
    """A data-layer check: None when the rubric is usable (its total is 7, or cannot be read: kept, unverified),
    else what is wrong with it."""
    if isinstance(value, list):
        total, error = _list_total(value)
        if error:
            return error
        return None if total == REQUIRED_TOTAL else f"rubric items total {total} points, expected {REQUIRED_TOTAL}"
    if not isinstance(value, str):
        return (f"expected a markdown string or a list of {{title, points, description}} items, "
                f"got {type(value).__name__}")
    if not value.strip():
        return "empty string"
    total = rubric_total(value)
    if total is None or total == REQUIRED_TOTAL:
        return None
    return f"rubric checkpoints total {total} points, expected {REQUIRED_TOTAL} (chains count by their maximum)"


def rubric_verified(value: Any) -> bool:
    """Whether a usable rubric's total was read (list rubrics always are)."""
    return isinstance(value, list) or read_rubric(value).verified
