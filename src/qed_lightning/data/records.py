"""The typed records of the data layer, with no framework import: `ProofProblem` (one RL prompt) and the policy
prompt it carries. Rollouts, rewards and modules import the record from here without pulling in Lightning."""

from __future__ import annotations

from dataclasses import dataclass, field

from qed_lightning.data.chat import POLICY_PROMPT, chat_prompt_ids

__all__ = ["ProofProblem", "render_policy_prompt"]


@dataclass
class ProofProblem:
    """One RL prompt: the problem statement, its rendered marking scheme, and the tokenized prompt the policy answers.

    Args:
        index: the problem's position among the file's readable rows (0-based; seeds are derived from it).
        problem, rubric, source: the statement, the rendered marking scheme, the source column.
        prompt_ids: the chat-templated prompt (the policy prompt, or a reasoning-cache state's prompt).
        line: the problem's 1-based line in the data file (row number for Parquet and hub data).
        pass_rate: the base model's pass rate (`reward_mean`), read when `data.reward_mean_range` is set.
        spare: a dynamic-sampling candidate beyond the step's `prompts_per_step` (`data.spare_prompts_per_step`).
        cycle: stage 3: the reasoning-cache state's cycle k (state s_k); None for a plain policy prompt.
        replayed: stage 3: the state comes from the replay buffer of an earlier step.
        repeat: stage 3 validation: which of the `val_samples` runs of the problem this is.
        summary: stage 3: the reasoning-cache state's summary (empty for s_0 and for a plain policy prompt).
    """

    index: int
    problem: str
    rubric: str
    source: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    line: int = 0
    pass_rate: float | None = None
    spare: bool = False
    cycle: int | None = None
    replayed: bool = False
    repeat: int = 0
    summary: str = ""


def render_policy_prompt(tokenizer, problem: str, template: str = POLICY_PROMPT) -> list[int]:
    """The paper's policy prompt (one user turn, no system prompt), chat-templated and tokenized."""
    return chat_prompt_ids(tokenizer, template.replace("{problem}", problem))
