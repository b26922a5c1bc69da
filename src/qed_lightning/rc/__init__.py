"""Reasoning cache (SPEC 5): the reason -> summarize -> reason loop, shared by stage-3 training and the test-time
scaffold. `ReasoningCacheRLModule` (in `qed_lightning.modules`) trains on its states; `run_reasoning_cache` is the
scaffold."""

from qed_lightning.rc.loop import (
    SUMMARIZER_SAMPLING,
    RCPrompt,
    RCState,
    RCTrajectory,
    ReasoningCache,
    chat_prompt_ids,
    load_rc_prompt,
    run_reasoning_cache,
    summary_text,
    thinking_text,
)

__all__ = [
    "SUMMARIZER_SAMPLING",
    "RCPrompt",
    "RCState",
    "RCTrajectory",
    "ReasoningCache",
    "chat_prompt_ids",
    "load_rc_prompt",
    "run_reasoning_cache",
    "summary_text",
    "thinking_text",
]
