"""Keeping `qed-report`'s page bounded whatever the run: whole GRPO groups, long texts cut, a total size.

A paper-scale run writes ~150 MB of rollout records a step; put in a page as is, a few dozen steps pass V8's
~512 MiB string limit and Chromium shows a blank page. Three bounds, each reported (the page's banner and
qed-report's log) when it cuts anything:

1. **Groups, not rollouts** (`--rollouts_per_step`): a step's records are grouped by GRPO group (the `group` and
   `problem_id` a record carries) and whole groups are kept, spread evenly over the step, as many as fit in the
   count (always at least one), so a group's G samples can be compared side by side.
2. **Texts cut** (`--max_chars`): each long text (completion, proof, judge reply, prompt, rubric, problem, RC state)
   keeps its head (3/4 of the bound) and its tail (1/4: a completion's proof is at its end), with a marker in the
   middle that names the record's file and line (`rollouts/step_000003.jsonl:17`) where the whole text is.
3. **The page's size** (`--max_mb`): when the kept records still weigh more than what is left of the bound after
   the page's code and metrics, whole groups are dropped, taking the steps in turn so that every step keeps some.

Records are read one step file at a time and cut as they are read, so memory follows what is kept, not the run.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qed_lightning.report.records import read_audit

__all__ = ["TEXT_FIELDS", "cut_text", "cut_texts", "fit_groups", "group_key", "json_size", "pick_groups", "read_groups"]

#: the fields a record may hold long text in
TEXT_FIELDS = ("completion", "proof", "judge_reply", "audit_reply", "prompt", "rubric", "problem", "state")
_STEP_FILE = re.compile(r"step_(\d+)\.jsonl$")


def cut_text(text: str, max_chars: int, where: str) -> str:
    """`text` itself when it fits in `max_chars`, else its head and tail around a marker naming `where` it is whole.

    >>> cut_text("abcdefghijklmnop", 8, "f.jsonl:3")
    'abcdef\\n[... 8 of 16 characters cut: the whole text is in f.jsonl:3 ...]\\nop'
    """
    if len(text) <= max_chars:
        return text
    head = max_chars * 3 // 4
    tail = max_chars - head
    return (f"{text[:head]}\n[... {len(text) - max_chars:,} of {len(text):,} characters cut: the whole text is in "
            f"{where} ...]\n{text[len(text) - tail:] if tail else ''}")


def cut_texts(record: dict[str, Any], max_chars: int | None, where: str) -> int:
    """Cut `record`'s long texts in place (see `cut_text`), noting `_at` (where the record is) and `_cut` (each cut
    field's full length); returns how many fields were cut."""
    record["_at"] = where
    if not max_chars:
        return 0
    cut = {}
    for field in TEXT_FIELDS:
        text = record.get(field)
        if isinstance(text, str) and len(text) > max_chars:
            record[field] = cut_text(text, max_chars, where)
            cut[field] = len(text)
    if cut:
        record["_cut"] = cut
    return len(cut)


def group_key(record: dict[str, Any]) -> tuple:
    """The GRPO group a record belongs to within its step: the rollouts of one prompt (stage 3: one RC state)."""
    return (record.get("group"), str(record.get("problem_id")), record.get("cycle"), record.get("scaffold"))


def pick_groups(sizes: list[int], per_step: int | None) -> list[int]:
    """Indices of the groups to keep: all when `per_step` is None, else groups spread evenly over the step, as many
    as fit in `per_step` records (at least one).

    >>> pick_groups([8] * 16, 64), pick_groups([8] * 4, 64), pick_groups([100, 100], 64)
    ([0, 2, 4, 6, 9, 11, 13, 15], [0, 1, 2, 3], [0])
    """
    if per_step is None or sum(sizes) <= per_step:
        return list(range(len(sizes)))
    mean = sum(sizes) / len(sizes)
    wanted = max(1, min(len(sizes), int(per_step // mean)))
    spread = sorted({round(k * (len(sizes) - 1) / (wanted - 1)) for k in range(wanted)}) if wanted > 1 else [0]
    kept, total = [], 0
    for i in spread:
        if kept and total + sizes[i] > per_step:
            continue
        kept.append(i)
        total += sizes[i]
    return kept


def _step_files(root: Path) -> list[Path]:
    folder = root / "rollouts"
    files = folder.glob("step_*.jsonl") if folder.is_dir() else []
    return sorted(files, key=lambda p: int(_STEP_FILE.search(p.name).group(1)))


def read_groups(root: str | Path, per_step: int | None = 64, max_chars: int | None = 8000) -> tuple[list[dict], dict]:
    """The rollout records of a run kept for the page (module docstring, bounds 1 and 2), in step order, and what
    was left out: `{"records": N read, "kept": n, "texts_cut": k}`."""
    root = Path(root)
    out: list[dict] = []
    stats = {"records": 0, "kept": 0, "texts_cut": 0}
    for path in _step_files(root):
        groups: dict[tuple, list[dict]] = defaultdict(list)
        audit = read_audit(root, int(_STEP_FILE.search(path.name).group(1)))  # the judge audit's side file, by index
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if line.strip():
                    record = json.loads(line)
                    record.update(audit.get(line_no - 1, {}))
                    record["_line"] = line_no
                    groups[group_key(record)].append(record)
        members = list(groups.values())
        stats["records"] += sum(map(len, members))
        for i in pick_groups([len(m) for m in members], per_step):
            for record in members[i]:
                stats["texts_cut"] += cut_texts(record, max_chars, f"rollouts/{path.name}:{record.pop('_line')}")
                out.append(record)
    stats["kept"] = len(out)
    return out, stats


def json_size(value: Any) -> int:
    """Bytes of `value` as the page embeds it (UTF-8 JSON)."""
    return len(json.dumps(value, ensure_ascii=False, default=str).encode("utf-8"))


def fit_groups(runs: list[dict[str, Any]], budget: int) -> int:
    """Drop whole groups from the runs' `rollouts` (in place) until they weigh at most `budget` bytes, taking the
    steps (of every run) in turn so that each keeps as many groups as the others; returns the records dropped."""
    groups: dict[tuple, list[int]] = defaultdict(list)  # (run, step, group) -> record indices, in page order
    for r, run in enumerate(runs):
        for i, record in enumerate(run.get("rollouts") or []):
            groups[(r, record.get("step"), *group_key(record))].append(i)
    sizes = {key: sum(json_size(runs[key[0]]["rollouts"][i]) + 1 for i in idx) for key, idx in groups.items()}
    if sum(sizes.values()) <= budget:
        return 0
    keep = set()
    total = 0
    for key in _round_robin(groups):
        if total + sizes[key] <= budget:
            keep.add(key)
            total += sizes[key]
    dropped = 0
    for r, run in enumerate(runs):
        kept = [rec for rec in run.get("rollouts") or [] if (r, rec.get("step"), *group_key(rec)) in keep]
        dropped += len(run.get("rollouts") or []) - len(kept)
        run["rollouts"] = kept
    return dropped


def _round_robin(groups: Iterable[tuple]) -> list[tuple]:
    """Group keys ordered so the first of every (run, step) comes first, then the second of each, and so on."""
    by_step: dict[tuple, list[tuple]] = defaultdict(list)
    for key in groups:
        by_step[key[:2]].append(key)
    order, depth = [], 0
    while len(order) < sum(map(len, by_step.values())):
        order += [keys[depth] for keys in by_step.values() if depth < len(keys)]
        depth += 1
    return order
