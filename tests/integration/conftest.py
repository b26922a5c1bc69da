import sys

import pytest
from vllm_server import SharedServer


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


SHARED_SERVER = SharedServer()


@pytest.fixture
def shared_vllm_server(tiny_model_dir, tmp_path_factory) -> str:
    """The base URL of the session's shared `vllm serve` of the tiny model (`vllm_server.SharedServer`)."""
    return SHARED_SERVER.start(tiny_model_dir, tmp_path_factory.mktemp("shared_vllm"))


def pytest_collection_modifyitems(session, config, items):
    """The shared server's users run one after another, from where the first of them is collected: an idle vLLM
    engine still takes ~10% of a core, and the suite runs files like the layout simulator's timing check in between."""
    uses = ["shared_vllm_server" in getattr(item, "fixturenames", ()) for item in items]
    if any(uses):
        first = uses.index(True)
        users = [item for item, use in zip(items, uses) if use]
        others = [item for item, use in zip(items, uses) if not use]
        items[:] = others[:first] + users + others[first:]
    config._shared_vllm_server_last = next(
        (item.nodeid for item in reversed(items) if "shared_vllm_server" in getattr(item, "fixturenames", ())), None)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop the shared server after the last test that uses it, so it does not idle beside the rest of the suite."""
    if item.nodeid == getattr(item.config, "_shared_vllm_server_last", None) or nextitem is None:
        SHARED_SERVER.stop()


def pytest_sessionfinish(session, exitstatus):
    SHARED_SERVER.stop()  # an interrupted session too
