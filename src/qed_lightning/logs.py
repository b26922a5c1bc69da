"""Console output of the command-line tools (`qed-fit`, `qed-eval`, `qed-report`, `qed-export`): quiet and useful.

By default a run shows our own lines (anything logged from `qed_lightning`, including through Lightning's
`rank_zero_info`) at INFO, every other library (vLLM, Lightning, transformers, httpx...) at WARNING and above (plus
the few INFO lines a user wants: that a resume restored its checkpoint, why fitting stopped), and drops the warnings
listed in `KNOWN_HARMLESS`: each was read and found to say nothing a user must act on here (the
reason is next to it). `-v` / `--verbose` or `QED_LOG_LEVEL=INFO` (or `DEBUG`) shows everything, vLLM's own log
format included.

How: vLLM configures a handler of its own that does not propagate, so in quiet mode we ask it not to
(`VLLM_CONFIGURE_LOGGING=0`) and its records reach our root handler and its filter; Lightning's own handler is
removed for the same reason. Python warnings go through logging (`logging.captureWarnings`) and so through the same
filter; deprecation notices (meant for developers) are ignored. Hub progress bars (transformers' "Loading weights",
datasets' "Generating train split") are switched off.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TextIO

__all__ = ["KNOWN_HARMLESS", "is_quiet", "pop_verbose", "setup_logging"]

_OURS = str(Path(__file__).resolve().parent)

#: warnings that are expected in our runs and need no action (regex, searched in the message); why each is harmless
KNOWN_HARMLESS: tuple[tuple[str, str], ...] = (
    (r"global random seed is set to", "vLLM in-process (our colocated engine) shares the seeded RNG on purpose"),
    (r"does not officially support disabling chunked prefill",
     "we disable it on CPU on purpose (vllm_engine docstring)"),
    (r"Enforce eager set|Inductor compilation was disabled", "eager mode is our CPU setting"),
    (r"Triton is (not installed|installed, but doesn't include CPU)|Model Runner V2 requires Triton",
     "no Triton on CPU; vLLM falls back by itself"),
    (r"is not found in LD_PRELOAD", "a vLLM CPU speed hint (tcmalloc / iomp), not an error"),
    (r"doesn't allow to use `torch.set_num_threads`", "vLLM binds the threads itself (vllm_engine docstring)"),
    (r"torch.distributed.reduce_op` is deprecated", "inside vLLM's own imports"),
    (r"isinstance\(treespec, LeafSpec\)", "inside Lightning's own code"),
    (r"when logging on epoch level in distributed setting",
     "the RL modules reduce over ranks themselves (modules/groups.py)"),
    (r"Total length of .* across ranks is zero", "an RL run without validation problems"),
    (r"no pre-optimization state was saved", "RL checkpoints hold the weights after the step, which resume expects"),
    (r"does not have many workers which may be a bottleneck", "our loaders hold prompts in memory"),
    (r"The number of training batches .* is smaller than the logging interval", "short demo runs"),
    (r"Setting accelerator to CPU", "DeepSpeed's import-time probe on a machine without a GPU; we chose the device"),
    (r"Reset SSM cache type", "vLLM's CPU platform on a model without Mamba layers"),
)
#: loggers that libraries give their own handler and `propagate = False` when first imported (DeepSpeed's
#: "Setting accelerator to CPU"): a filter on the logger itself applies whatever handler they add later
_SELF_HANDLED = ("DeepSpeed",)
_HARMLESS = re.compile("|".join(f"(?:{pattern})" for pattern, _ in KNOWN_HARMLESS))
#: a library's INFO lines that a user of a run wants to see (that a resume really restored its checkpoint)
_USEFUL = re.compile(
    r"Restoring states from the checkpoint|Restored all states from the checkpoint|`Trainer.fit` stopped")


_quiet = False


def is_quiet() -> bool:
    """Whether the command-line run is in quiet mode (no `-v`, no `QED_LOG_LEVEL`): progress bars and summaries
    that only libraries print (vLLM's weight-loading bar, Lightning's model summary) are switched off then."""
    return _quiet


def _is_ours(record: logging.LogRecord) -> bool:
    return record.name.startswith("qed_lightning") or record.pathname.startswith(_OURS)


class QuietFilter(logging.Filter):
    """Our records from INFO up; other libraries' from WARNING up, less the known harmless ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_ours(record):
            return record.levelno >= logging.INFO
        if record.levelno < logging.WARNING:
            return record.levelno >= logging.INFO and bool(_USEFUL.search(record.getMessage()))
        return not _HARMLESS.search(record.getMessage())


class _Formatter(logging.Formatter):
    """INFO lines as they are; a warning or error with its level and logger, so a reader knows where it came from."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno < logging.WARNING:
            return message
        name = "python warning" if record.name == "py.warnings" else record.name
        return f"{record.levelname} [{name}] {message}"


def pop_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without `-v`/`--verbose`, and whether it was there (LightningCLI would refuse the unknown flag)."""
    kept = [a for a in argv if a not in ("-v", "--verbose")]
    return kept, len(kept) != len(argv)


def _level(verbose: bool) -> int | None:
    """The level asked for (None = quiet mode): `QED_LOG_LEVEL` wins over `-v` (= INFO)."""
    name = os.environ.get("QED_LOG_LEVEL", "").strip().upper()
    if name:
        level = logging.getLevelName(name)
        if not isinstance(level, int):
            raise ValueError(f"QED_LOG_LEVEL={name!r} is not a logging level; use DEBUG, INFO, WARNING or ERROR")
        return level
    return logging.INFO if verbose else None


def _quiet_libraries() -> None:
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # its records then propagate to our filtered handler
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars ("Loading weights") follow it
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # libraries imported already read the variables above too early: switch their bars off directly
    if (hub := sys.modules.get("huggingface_hub")) is not None:
        hub.utils.disable_progress_bars()
    if (transformers := sys.modules.get("transformers")) is not None:
        transformers.utils.logging.disable_progress_bar()
    if (datasets := sys.modules.get("datasets")) is not None:
        datasets.disable_progress_bars()
    # deprecation notices address the developers of the code that calls a library, not a user of a run
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def setup_logging(verbose: bool = False, stream: TextIO | None = None) -> int | None:
    """Configure the root logger for a command-line run (see the module docstring), writing to `stream` (default
    stderr); returns the level asked for (None = quiet mode). Safe to call twice: the previous handler is replaced."""
    global _quiet
    level = _level(verbose)
    _quiet = level is None
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_qed", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._qed = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter("%(message)s"))
    if level is None:
        _quiet_libraries()
        handler.addFilter(QuietFilter())
        root.setLevel(logging.INFO)
    else:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", logging.getLevelName(min(level, logging.INFO)))
        root.setLevel(level)
    root.addHandler(handler)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric", "vllm"):
        lib = logging.getLogger(name)  # Lightning (and vLLM, imported before us) add their own handler at import
        for own in list(lib.handlers):
            lib.removeHandler(own)
        lib.propagate = True
    for name in _SELF_HANDLED:
        lib = logging.getLogger(name)
        for old in [f for f in lib.filters if isinstance(f, QuietFilter)]:
            lib.removeFilter(old)
        if level is None:
            lib.addFilter(QuietFilter())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per judge request otherwise
    logging.captureWarnings(True)
    return level
