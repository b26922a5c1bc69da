"""Marking schemes: render a rubric for the judge prompt, and check that it is worth 7 points (SPEC 2).

A FineProofs-RL rubric is markdown with three sections: *Checkpoints (7 pts total)* with integer points, *Zero-credit
items* and *Deductions*. When a problem admits parallel solution paths, the checkpoints come as chains ("Chain A",
"Chain B") that are scored by the best chain, never summed. A rubric may also arrive as a list of
`{title, points, description}` items (the paper's rendering: `# {title} ({points} points)\\nDescription: ...`).

Paper's choice: the rubric text is pasted into the judge prompt as is. Ours: the same, plus `rubric_total`, which the
data layer uses to reject rubrics whose checkpoints do not add up to 7 before any training starts.

What `rubric_total` reads (documented because real rubrics vary in markup):
- the section starts at a line that is a heading, a bold line or a numbered item containing "Checkpoints", and ends
  at the next markdown heading or at a "Zero-credit" / "Deductions" line;
- a checkpoint is a bullet or numbered item that starts with a bold point count: `- **2 pts**: ...`, `- **1 pt**:`,
  `* **3 pts:** ...`; every such item in the section counts, whatever its indentation;
- a bold line, bold bullet or heading starting with "Chain X" opens chain X; any other bold-only line closes the chain
  (back to common items). Total = common points + the largest chain subtotal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["render_rubric", "rubric_total"]

_CHECKPOINT_START = re.compile(r"^\s*(?:#{1,6}\s*|\d+\.\s*|[-*+]\s*)?\**\s*checkpoints\b", re.IGNORECASE)
_SECTION_END = re.compile(
    r"^\s*(?:#{1,6}\s|(?:\d+\.\s*|[-*+]\s*)?\**\s*(?:zero[\s-]*credit|deductions)\b)", re.IGNORECASE
)
_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s+\*\*\s*(\d+)\s*pts?\b\.?\s*:?\s*\*\*", re.IGNORECASE)
_CHAIN = re.compile(
    r"^\s*(?:[-*+]\s+|#{1,6}\s*)?\*\*\s*chain\s+([A-Za-z0-9]+)\b"  # **Chain A (...)**, - **Chain A: ...**
    r"|^\s*#{1,6}\s*chain\s+([A-Za-z0-9]+)\b",  # ### Chain A
    re.IGNORECASE,
)
_BOLD_LINE = re.compile(r"^\s*(?:[-*+]\s+)?\*\*[^*]+\*\*\s*:?\s*$")


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


def _checkpoint_lines(rubric_markdown: str) -> list[str]:
    lines = rubric_markdown.splitlines()
    starts = [i for i, line in enumerate(lines) if _CHECKPOINT_START.match(line)]
    if not starts:
        raise ValueError(
            "rubric has no checkpoint section: expected a heading or bold line containing 'Checkpoints' "
            f"(e.g. '## Checkpoints (7 pts total)'); the rubric starts with {rubric_markdown.strip()[:80]!r}."
        )
    section = []
    for line in lines[starts[0] + 1 :]:
        if _SECTION_END.match(line) and not _CHAIN.match(line):
            break
        section.append(line)
    return section


def rubric_total(rubric_markdown: str) -> int:
    """Points of a markdown rubric's checkpoints: common items plus the best of the parallel chains.

    >>> rubric_total("## Checkpoints (7 pts total)\\n- **3 pts**: a\\n- **4 pts**: b\\n## Deductions\\n- **1 pt**: x")
    7
    >>> rubric_total('''## Checkpoints
    ... - **1 pt**: common setup
    ... **Chain A (induction)**
    ... - **4 pts**: step
    ... - **2 pts**: finish
    ... **Chain B (algebra)**
    ... - **5 pts**: identity''')
    7
    """
    common, chains, current = 0, {}, None
    for line in _checkpoint_lines(rubric_markdown):
        chain = _CHAIN.match(line)
        item = _ITEM.match(line)
        if chain:
            current = (chain.group(1) or chain.group(2)).upper()
            chains.setdefault(current, 0)
        elif item and current is not None:
            chains[current] += int(item.group(1))
        elif item:
            common += int(item.group(1))
        elif _BOLD_LINE.match(line):
            current = None
    if common == 0 and not any(chains.values()):
        raise ValueError(
            "rubric's checkpoint section has no checkpoint items: expected lines like '- **2 pts**: ...'; "
            f"the section reads {chr(10).join(_checkpoint_lines(rubric_markdown))[:120]!r}."
        )
    return common + max(chains.values(), default=0)
