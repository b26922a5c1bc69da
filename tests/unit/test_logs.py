"""Quiet output: our lines at INFO, other libraries' at WARNING less the known harmless ones, a few useful library
INFO lines kept, and -v / QED_LOG_LEVEL to see everything (real records through the real handler)."""

from __future__ import annotations

import io
import logging

import pytest

import qed_lightning.logs as logs


@pytest.fixture
def output(monkeypatch):
    """What the handler `setup_logging` installs writes, for the records logged in the test; the root logger is
    restored afterwards (pytest's own handlers stay)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    for name in ("VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_LEVEL", "QED_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    yield stream
    for handler in [h for h in root.handlers if getattr(h, "_qed", False)]:
        root.removeHandler(handler)
    root.handlers[:], root.level = saved[0], saved[1]
    logging.captureWarnings(False)


def _emit() -> None:
    logging.getLogger("qed_lightning.modules.x").info("our line")
    logging.getLogger("vllm.engine").info("vLLM chatter")
    logging.getLogger("vllm.engine").warning("libtcmalloc is not found in LD_PRELOAD. For best performance...")
    logging.getLogger("vllm.engine").warning("a real vLLM warning")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: try installing litlogger")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("Restoring states from the checkpoint path at x")


def test_quiet_by_default(output):
    assert logs.setup_logging(stream=output) is None
    _emit()
    assert output.getvalue().splitlines() == [
        "our line", "WARNING [vllm.engine] a real vLLM warning", "Restoring states from the checkpoint path at x"]
    assert logs.os.environ["VLLM_CONFIGURE_LOGGING"] == "0"  # vLLM's records come to this handler


def test_verbose_and_the_env_variable_show_everything(output, monkeypatch):
    assert logs.setup_logging(verbose=True, stream=output) == logging.INFO
    _emit()
    assert len(output.getvalue().splitlines()) == 6
    monkeypatch.setenv("QED_LOG_LEVEL", "warning")
    assert logs.setup_logging(stream=output) == logging.WARNING
    monkeypatch.setenv("QED_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="QED_LOG_LEVEL='LOUD' is not a logging level"):
        logs.setup_logging(stream=output)


def test_pop_verbose_leaves_the_other_arguments():
    assert logs.pop_verbose(["-v", "--config", "a.yaml", "--verbose"]) == (["--config", "a.yaml"], True)
    assert logs.pop_verbose(["--config", "a.yaml"]) == (["--config", "a.yaml"], False)
