"""The code passes the linter configured in pyproject.toml (`[tool.ruff]`: lines of at most 120 characters, ruff's
default correctness rules). Run it by hand with `.venv/bin/ruff check src tests scripts`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ruff() -> str | None:
    """The ruff installed beside this interpreter (the venv's, from the `dev` extra), else one on PATH."""
    beside = Path(sys.executable).parent / "ruff"
    return str(beside) if beside.is_file() else shutil.which("ruff")


def test_ruff_check_passes():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed: scripts/setup.sh installs it with the `dev` extra (pyproject.toml)")
    proc = subprocess.run(
        [ruff, "check", "--no-cache", "--output-format", "concise", "src", "tests", "scripts"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"`ruff check src tests scripts` found problems:\n{proc.stdout}{proc.stderr}"
