import sys

import pytest


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    """LightningCLI warns when both `args=` and sys.argv carry arguments; tests pass `args=` only."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])


@pytest.fixture
def judge_servers(monkeypatch):
    """Every scripted judge server started during the test (each keeps its request counters after closing)."""
    from qed_lightning.testing import scripted_client
    from qed_lightning.testing.judge_server import ScriptedJudgeServer

    started: list[ScriptedJudgeServer] = []

    class RecordedServer(ScriptedJudgeServer):
        def start(self) -> ScriptedJudgeServer:
            started.append(self)
            return super().start()

    monkeypatch.setattr(scripted_client, "ScriptedJudgeServer", RecordedServer)
    return started
