"""The reward side of rubric RL (SPEC 4) and of evaluation grading (SPEC 6).

- `parsing`: what is graded (`extract_proof`) and how a judge's reply becomes a score (`parse_score`,
  `parse_points`); pure and doctested.
- rubric rendering and reading live in `qed_lightning.data.rubric` (data-format code); re-exported here.
- `templates`: the versioned judge prompts under `prompts/` and a brace-safe renderer (`load_prompt`).
- `clients`: `OpenAIJudgeClient` (any OpenAI-compatible endpoint, chat or responses API); `engine_client`:
  `EngineJudgeClient` (a local rollout engine as the judge).
- `cache`: the optional on-disk grade cache.
- `judge`: `BaseJudge` (concurrency, grade cache, circuit breaker, failure policy); `judges`: `RubricJudge` (the
  RL reward) and `ProofBenchJudge` (IMO-ProofBench grading) on it.

For tests and CPU demos, `qed_lightning.testing.ScriptedJudgeClient` stands in for a real judge.
"""

from qed_lightning.rewards.cache import GradeCache, grade_cache_key
from qed_lightning.rewards.clients import JudgeClient, JudgeError, OpenAIJudgeClient
from qed_lightning.rewards.judge import BaseJudge, JudgeDownError, JudgeFailuresError
from qed_lightning.rewards.judges import ProofBenchJudge, RubricJudge
from qed_lightning.rewards.parsing import band_score, extract_proof, parse_points, parse_score, strip_self_evaluation
from qed_lightning.data.rubric import render_rubric, rubric_total
from qed_lightning.rewards.templates import JudgePrompt, load_prompt
from qed_lightning.rewards.types import Grade, GradeRequest


def __getattr__(name: str):
    # EngineJudgeClient imports torch and transformers; load it only when asked for, so the HTTP judge path
    # (and the scripted judge server's CLI) start fast.
    if name == "EngineJudgeClient":
        from qed_lightning.rewards.engine_client import EngineJudgeClient

        return EngineJudgeClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BaseJudge",
    "EngineJudgeClient",
    "Grade",
    "GradeCache",
    "GradeRequest",
    "JudgeClient",
    "JudgeDownError",
    "JudgeFailuresError",
    "JudgeError",
    "JudgePrompt",
    "OpenAIJudgeClient",
    "ProofBenchJudge",
    "RubricJudge",
    "band_score",
    "extract_proof",
    "grade_cache_key",
    "load_prompt",
    "parse_points",
    "parse_score",
    "render_rubric",
    "rubric_total",
    "strip_self_evaluation",
]
