"""The suite's own layout: pytest imports test files by basename (rootdir-relative "rootdir" import mode, no packages),
so two test files of the same name in tests/unit and tests/integration stop the whole run at collection."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_file_basenames_are_unique():
    seen: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if path.name.startswith("test_") or path.name in {"runs.py", "fakes.py"}:
            seen[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not clashes, f"test modules share a basename (pytest cannot import both): {clashes}"
