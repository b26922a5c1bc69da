"""Test-time scaffolds: how a policy turns a problem into the response that is graded (SPEC 5, 6).

- `DirectScaffold`: one sample of the policy prompt (the paper's single-pass number).
- `ReasoningCacheScaffold`: the reasoning-cache loop of stage 3 at test time (K = 3 iterations, the model
  summarizing itself by default); the graded answer is the text after `</think>` of the last iteration.
- `GenerateVerifyRefine`: the model writes a proof, grades its own proof on the IMO scale with a self-verification
  prompt, then rewrites it given its own critique; at most `rounds` verify/refine rounds, stopping early for a
  problem once its self-grade is full marks (7). Prompts are ours (`eval/prompts/gvr_*.txt`).

Every scaffold batches all problems into each generation call and reports, per problem, all tokens it generated
(every call: attempts, self-checks, summaries), so scaffolds can be compared at equal cost. A scaffold's `run` takes
a flat list of problem statements (the same problem repeated for repeated samples) and returns one
`ScaffoldOutput` per entry. Every generation call of a scaffold draws its own random stream: the seed of each
entry's first call comes with `sampling` (the evaluator derives it from the sample's key), later rounds derive
theirs from it (`qed_lightning.seeds.derive_sampling`). Override point: subclass `Scaffold` and implement `run`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from qed_lightning.data.chat import POLICY_PROMPT, chat_prompt_ids
from qed_lightning.rewards.parsing import extract_proof, parse_points, strip_self_evaluation
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.seeds import derive_sampling

__all__ = ["DirectScaffold", "GenerateVerifyRefine", "ReasoningCacheScaffold", "Scaffold", "ScaffoldOutput",
           "chat_prompt_ids", "load_scaffold_prompt", "sampling_settings"]

NO_PROOF = "(The earlier attempt ran out of space before it wrote a final proof.)"
NO_CRITIQUE = "(The check did not finish. Re-examine every step of the earlier attempt yourself.)"


@dataclass
class ScaffoldOutput:
    """What a scaffold produced for one problem.

    Args:
        prompt: the first user prompt (before chat templating).
        response: the text that is graded; the judge reads the part after its last `</think>`.
        tokens: every token the scaffold generated for this problem, over all its generation calls.
        truncated: the final generation hit `max_new_tokens`.
        calls: generation calls that involved this problem.
        trace: per-step records (self-grades and critiques, summaries), written to the per-sample JSONL.
    """

    prompt: str
    response: str
    tokens: int
    truncated: bool
    calls: int = 1
    trace: list[dict[str, Any]] = field(default_factory=list)


def generate_texts(engine: RolloutEngine, tokenizer, texts: list[str], sampling: SamplingConfig) -> list[Completion]:
    """One batched engine call: one completion per user prompt."""
    if not texts:
        return []
    groups = engine.generate([chat_prompt_ids(tokenizer, t) for t in texts], sampling, n=1)
    return [group[0] for group in groups]


def sampling_settings(sampling: SamplingConfig) -> dict[str, Any]:
    """The sampling fields a run manifest records (named, so a field added to `SamplingConfig` later changes
    nothing)."""
    return {k: getattr(sampling, k) for k in ("temperature", "top_p", "top_k", "max_new_tokens", "seed")}


def load_scaffold_prompt(name_or_path: str) -> str:
    """A packaged scaffold prompt by name ("gvr_verify") or a prompt file by path."""
    packaged = resources.files(__package__) / "prompts" / f"{name_or_path}.txt"
    if "/" not in name_or_path and packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(f"scaffold prompt {name_or_path!r} is neither a packaged prompt (gvr_verify, gvr_refine) "
                     "nor a file.")


def fill(template: str, **values: str) -> str:
    """Substitute `{name}` placeholders in one pass (LaTeX braces in the values are left alone).

    >>> fill("P: {problem} / {proof}", problem=r"$\\frac{a}{b}$", proof="uses {problem}")
    'P: $\\\\frac{a}{b}$ / uses {problem}'
    """
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


class Scaffold(ABC):
    """A test-time strategy. Args: name: how its samples are keyed and reported (default: the scaffold's kind);
    prompt_template: the policy prompt, `{problem}` replaced by the statement."""

    kind: ClassVar[str] = "scaffold"

    def __init__(self, name: str | None = None, prompt_template: str = POLICY_PROMPT) -> None:
        if "{problem}" not in prompt_template:
            raise ValueError("scaffold.prompt_template must contain the placeholder {problem}.")
        self.name = name or self.kind
        self.prompt_template = prompt_template

    def policy_prompt(self, problem: str) -> str:
        return self.prompt_template.replace("{problem}", problem)

    def settings(self) -> dict[str, Any]:
        """The settings that change this scaffold's outputs (recorded in the run manifest)."""
        return {"kind": self.kind, "prompt_template": self.prompt_template}

    @abstractmethod
    def run(self, problems: list[str], engine: RolloutEngine, tokenizer,
            sampling: SamplingConfig) -> list[ScaffoldOutput]:
        """One output per entry of `problems`, all problems batched into each generation call."""


class DirectScaffold(Scaffold):
    """One sample of the policy prompt per problem (single pass). Arguments as for `Scaffold`."""

    kind = "direct"

    def run(self, problems: list[str], engine: RolloutEngine, tokenizer,
            sampling: SamplingConfig) -> list[ScaffoldOutput]:
        prompts = [self.policy_prompt(p) for p in problems]
        completions = generate_texts(engine, tokenizer, prompts, sampling)
        return [ScaffoldOutput(prompt, c.text, len(c.completion_ids), c.truncated)
                for prompt, c in zip(prompts, completions)]


@dataclass
class _Attempt:
    """The running state of one problem in generate-verify-refine."""

    completion: Completion
    tokens: int
    calls: int = 1
    done: bool = False
    trace: list[dict[str, Any]] = field(default_factory=list)

    def proof(self) -> str | None:
        proof = extract_proof(self.completion.text)
        return strip_self_evaluation(proof) if proof else None


def self_check(verdict: Completion) -> tuple[int | None, str]:
    """(self-grade, critique) of a verification reply: the `<points>` verdict and the text after `</think>`.

    >>> self_check(Completion([], [1], [0.0], "stop", "<think>hm</think>Step 2 is wrong. <points>1 out of 7</points>"))
    (1, 'Step 2 is wrong. <points>1 out of 7</points>')
    >>> self_check(Completion([], [1], [0.0], "length", "<think>still checking"))[0] is None
    True
    """
    critique = extract_proof(verdict.text)
    if not critique:
        return None, NO_CRITIQUE
    return parse_points(critique), critique


class GenerateVerifyRefine(Scaffold):
    """Generate, self-verify, refine; see the module docstring.

    Args:
        rounds: the most verify/refine rounds (0 = direct generation).
        verify_prompt: self-verification prompt (packaged name or file; placeholders `{problem}`, `{proof}`).
        refine_prompt: revision prompt (placeholders `{problem}`, `{proof}`, `{critique}`).
        verify_max_new_tokens: budget of a self-check (None = the generation budget).
        name, prompt_template: as for `Scaffold`.
    """

    kind = "gvr"

    def __init__(self, rounds: int = 2, verify_prompt: str = "gvr_verify", refine_prompt: str = "gvr_refine",
                 verify_max_new_tokens: int | None = None, name: str | None = None,
                 prompt_template: str = POLICY_PROMPT) -> None:
        super().__init__(name, prompt_template)
        if rounds < 0:
            raise ValueError(f"scaffold.rounds must be >= 0, got {rounds}.")
        self.rounds, self.verify_max_new_tokens = rounds, verify_max_new_tokens
        self.verify_template = load_scaffold_prompt(verify_prompt)
        self.refine_template = load_scaffold_prompt(refine_prompt)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "rounds": self.rounds, "verify": self.verify_template,
                "refine": self.refine_template, "verify_max_new_tokens": self.verify_max_new_tokens}

    def run(self, problems: list[str], engine: RolloutEngine, tokenizer,
            sampling: SamplingConfig) -> list[ScaffoldOutput]:
        prompts = [self.policy_prompt(p) for p in problems]
        attempts = [_Attempt(c, len(c.completion_ids)) for c in generate_texts(engine, tokenizer, prompts, sampling)]
        for round_ in range(1, self.rounds + 1):
            critiques = self._verify(problems, attempts, round_, engine, tokenizer, sampling)
            if not critiques:
                break
            self._refine(problems, attempts, critiques, round_, engine, tokenizer, sampling)
        return [ScaffoldOutput(prompt, a.completion.text, a.tokens, a.completion.truncated, a.calls, a.trace)
                for prompt, a in zip(prompts, attempts)]

    def _verify(self, problems: list[str], attempts: list[_Attempt], round_: int, engine, tokenizer,
                sampling: SamplingConfig) -> dict[int, str]:
        """Self-check every unfinished attempt that has a proof; returns {index: critique} of those to refine."""
        active = [i for i, a in enumerate(attempts) if not a.done]
        checkable = [i for i in active if attempts[i].proof()]
        budget = self.verify_max_new_tokens or sampling.max_new_tokens
        verify_sampling = replace(derive_sampling(sampling, "verify", round_, indices=checkable), max_new_tokens=budget)
        texts = [fill(self.verify_template, problem=problems[i], proof=attempts[i].proof()) for i in checkable]
        verdicts = dict(zip(checkable, generate_texts(engine, tokenizer, texts, verify_sampling)))
        critiques = {}
        for i in active:
            verdict = verdicts.get(i)
            grade, critique = self_check(verdict) if verdict is not None else (None, NO_PROOF)
            if verdict is not None:
                attempts[i].tokens += len(verdict.completion_ids)
                attempts[i].calls += 1
            attempts[i].trace.append({"round": round_, "self_grade": grade, "critique": critique})
            attempts[i].done = grade == 7
            if not attempts[i].done:
                critiques[i] = critique
        return critiques

    def _refine(self, problems: list[str], attempts: list[_Attempt], critiques: dict[int, str], round_: int, engine,
                tokenizer, sampling: SamplingConfig) -> None:
        order = list(critiques)
        texts = [fill(self.refine_template, problem=problems[i], proof=attempts[i].proof() or NO_PROOF,
                      critique=critiques[i]) for i in order]
        refine_sampling = derive_sampling(sampling, "refine", round_, indices=order)
        for i, revised in zip(order, generate_texts(engine, tokenizer, texts, refine_sampling)):
            attempts[i].completion = revised
            attempts[i].tokens += len(revised.completion_ids)
            attempts[i].calls += 1


class ReasoningCacheScaffold(Scaffold):
    """The reasoning-cache loop at test time (`qed_lightning.rc.run_reasoning_cache`); the answer is the last
    attempt's text after `</think>`. Tokens count every attempt and every summary.

    Args:
        cycles: reasoning iterations per problem (paper: 3).
        summarizer: a separate summarizer engine; None = the model summarizes itself (paper, at test time).
        summarizer_tokenizer: tokenizer of a separate summarizer (None = the policy's).
        summarizer_sampling: sampling of the summaries (None = the RC default: T 0.7, top_p 0.8, top_k 20, 2,048).
        summary_max_new_tokens: the summaries' token budget; None = 2,048 (the paper's instruct summarizer) with a
            separate summarizer or an explicit `summarizer_sampling`, and the generation budget
            (`max_new_tokens`) when the model summarizes itself: a thinking policy first thinks, and a summary
            cut off inside `<think>` would be raw thinking (`rc.summary_text` keeps what follows `</think>`).
        reasoning_prompt / summary_prompt: RC templates (packaged names or paths).
        summary_input_split: the summarizer reads an attempt's thinking up to its "last" `</think>` (ours) or its
            "first" (the reference).
        name: as for `Scaffold` (the RC prompts replace the policy prompt, so there is no `prompt_template`).
    """

    kind = "reasoning_cache"

    def __init__(self, cycles: int = 3, summarizer: RolloutEngine | None = None,
                 summarizer_tokenizer: str | None = None,
                 summarizer_sampling: SamplingConfig | None = None, summary_max_new_tokens: int | None = None,
                 reasoning_prompt: str = "rc_reasoning_v1", summary_prompt: str = "rc_summary_v1",
                 summary_input_split: Literal["last", "first"] = "last",
                 name: str | None = None) -> None:
        super().__init__(name)
        if cycles < 1 or (summary_max_new_tokens is not None and summary_max_new_tokens < 1):
            raise ValueError(f"scaffold.cycles and scaffold.summary_max_new_tokens must be >= 1, got {cycles} and "
                             f"{summary_max_new_tokens}.")
        self.cycles, self.summarizer, self.summarizer_tokenizer = cycles, summarizer, summarizer_tokenizer
        self.summarizer_sampling, self.summary_max_new_tokens = summarizer_sampling, summary_max_new_tokens
        self.reasoning_prompt, self.summary_prompt = reasoning_prompt, summary_prompt
        self.summary_input_split = summary_input_split

    def settings(self) -> dict[str, Any]:
        sampling = sampling_settings(self.summarizer_sampling) if self.summarizer_sampling is not None else None
        summarizer = type(self.summarizer).__name__ if self.summarizer is not None else None
        return {"kind": self.kind, "cycles": self.cycles, "summarizer": summarizer, "summarizer_sampling": sampling,
                "summary_max_new_tokens": self.summary_max_new_tokens,
                "reasoning_prompt": self.reasoning_prompt, "summary_prompt": self.summary_prompt,
                "summary_input_split": self.summary_input_split}

    def summary_sampling(self, sampling: SamplingConfig) -> SamplingConfig:
        """The summaries' sampling for a run generating with `sampling` (see `summary_max_new_tokens`)."""
        from qed_lightning.rc.loop import SUMMARIZER_SAMPLING

        summary = self.summarizer_sampling or SUMMARIZER_SAMPLING
        self_summary = self.summarizer is None and self.summarizer_sampling is None
        budget = self.summary_max_new_tokens or (sampling.max_new_tokens if self_summary else summary.max_new_tokens)
        return replace(summary, max_new_tokens=budget)

    def run(self, problems: list[str], engine: RolloutEngine, tokenizer,
            sampling: SamplingConfig) -> list[ScaffoldOutput]:
        from qed_lightning.rc.loop import run_reasoning_cache  # stage 3's loop, loaded on use

        trajectories = run_reasoning_cache(
            problems, engine, tokenizer, sampling, cycles=self.cycles, summarizer=self.summarizer,
            summarizer_tokenizer=self.summarizer_tokenizer, summarizer_sampling=self.summary_sampling(sampling),
            reasoning_prompt=self.reasoning_prompt, summary_prompt=self.summary_prompt,
            summary_input_split=self.summary_input_split,
        )
        return [self._output(t) for t in trajectories]

    @staticmethod
    def _output(trajectory) -> ScaffoldOutput:
        last = trajectory.attempts[-1]
        states = trajectory.states
        trace = [{"cycle": k, "attempt_tokens": len(a.completion_ids),
                  "closed_thinking": extract_proof(a.text) is not None,
                  "summary": states[k + 1].summary if k + 1 < len(states) else None}
                 for k, a in enumerate(trajectory.attempts)]
        calls = len(trajectory.attempts) + sum(s is not None for s in trajectory.summaries)
        return ScaffoldOutput(trajectory.states[0].prompt_text, last.text, trajectory.tokens, last.truncated, calls,
                              trace)
