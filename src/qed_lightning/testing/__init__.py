"""Test and demo stand-ins. Nothing here is used by a real training run.

- `ScriptedJudgeServer`: a real HTTP server speaking the OpenAI-compatible judge protocol, scoring proofs with a
  deterministic rule, with fault injection (`python -m qed_lightning.testing.judge_server` runs it standalone).
- `ScriptedJudgeClient`: an `OpenAIJudgeClient` that starts its own scripted server; one line in a demo config.
"""

from importlib import import_module

__all__ = ["ScoringRule", "ScriptedJudgeClient", "ScriptedJudgeServer"]

_HOMES = {
    "ScoringRule": "qed_lightning.testing.judge_rules",
    "ScriptedJudgeServer": "qed_lightning.testing.judge_server",
    "ScriptedJudgeClient": "qed_lightning.testing.scripted_client",
}


def __getattr__(name: str):
    # Imported on first access, so `python -m qed_lightning.testing.judge_server` does not import itself twice.
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
