import sys

import pytest


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    """LightningCLI warns when both `args=` and sys.argv carry arguments; tests pass `args=` only."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
