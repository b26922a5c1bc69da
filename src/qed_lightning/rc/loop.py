"""The reasoning-cache (RC) loop (SPEC 5): reason, summarize, reason again from the summary.

Per problem, K cycles; state s_0 carries an empty summary. Cycle k (k = 0..K-1):
1. **reason**: the policy answers state k's reasoning prompt, one chat-templated user turn with the sections
   `### PROBLEM`, `### SUMMARY OF PREVIOUS ATTEMPT`, `### INSTRUCTIONS` (from scratch when there is no summary,
   otherwise: improve on the attempt);
2. **summarize**: the summarizer receives `### PROBLEM`, `### EXISTING SUMMARY` and `### LATEST CANDIDATE SOLUTION`
   (the *thinking* of attempt k: its text before the last `</think>`, or all of it when there is none) and writes at
   most two first-person paragraphs. That summary REPLACES the previous one and makes state k+1.
So a run yields K+1 states s_0..s_K, K attempts (attempt k answers state k) and K summaries. All problems of a batch
advance together: each cycle is one `engine.generate` call for the reasoning of every problem and one
`summarizer.generate` call for the summaries, never one problem at a time.

Training (`ReasoningCacheRLModule`) samples states among s_0..s_K and trains on fresh rollouts of their prompts; at
test time (`run_reasoning_cache`) the answer is the text after the last `</think>` of the last attempt.

Paper's choice: a separate frozen `Qwen/Qwen3-4B-Instruct-2507` summarizer (T 0.7, top_p 0.8, top_k 20, 2,048
tokens) in training, the model summarizing itself at test time. Ours: both (`summarizer=None` = the policy's own
engine and tokenizer). Where the paper leaves it open:
- the prompts are ours, versioned files under `rc/prompts/`; each holds two variants, one for an empty summary and
  one for the later cycles, separated by the line `VARIANT_MARKER`;
- what the summarizer reads of an attempt is its thinking up to the last `</think>` (`summary_input_split="last"`,
  ours) or the first (`"first"`, the reference's split; the two differ only for an attempt that closes its thinking
  more than once);
- the summary is the summarizer's text after its last `</think>` (a thinking model summarizing itself), or all of
  it (an instruct model), stripped; a summarizer output that hits its token limit is still used as the new summary
  and counted (`Completion.truncated`), and an empty summary sends the next cycle back to the from-scratch prompt;
- the test-time scaffold skips the summary of the last attempt (`summarize_last=False`), which nothing reads;
- every call draws its own random stream: cycle k's reasoning seeds are `derive_seed(s, "cycle", k)` and its
  summaries' `derive_seed(s, "summary", k)` of each problem's seed s (`qed_lightning.seeds`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from qed_lightning.data.chat import chat_prompt_ids
from qed_lightning.rewards.parsing import THINK_CLOSE, extract_proof
from qed_lightning.rewards.templates import make_prompt
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.seeds import derive_sampling

__all__ = [
    "PLACEHOLDERS", "SUMMARIZER_SAMPLING", "VARIANT_MARKER", "RCPrompt", "RCState", "RCTrajectory", "ReasoningCache",
    "chat_prompt_ids", "load_rc_prompt", "run_reasoning_cache", "summary_text", "thinking_text",
]

PLACEHOLDERS = ("problem", "summary", "existing_summary", "latest")
VARIANT_MARKER = "%%% when there is a summary %%%"
THINK_OPEN = "<think>"
#: the paper's summarizer sampling (ref): Qwen3-4B-Instruct-2507 at T 0.7, top_p 0.8, top_k 20, 2,048 new tokens
SUMMARIZER_SAMPLING = SamplingConfig(temperature=0.7, top_p=0.8, top_k=20, max_new_tokens=2048)
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


# -- prompts -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RCPrompt:
    """An RC prompt template: `first` when there is no summary yet, `later` otherwise; `version` = name@sha8."""

    name: str
    version: str
    first: str
    later: str

    def render(self, has_summary: bool, **values: str) -> str:
        """Fill the variant's placeholders in one pass (brace-safe: LaTeX braces and `{...}` in values stay as is).

        >>> p = RCPrompt("t", "t@0", "P: {problem}", "P: {problem}\\nS: {summary}")
        >>> p.render(False, problem=r"$\\frac{a}{b}$", summary="")
        'P: $\\\\frac{a}{b}$'
        >>> p.render(True, problem="x", summary="I used {summary} once.")
        'P: x\\nS: I used {summary} once.'
        """
        text = self.later if has_summary else self.first
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def _packaged(name: str):
    return resources.files(__package__) / "prompts" / f"{name}.txt"


def load_rc_prompt(name_or_path: str, required: tuple[str, ...], summary_field: str) -> RCPrompt:
    """Load a packaged RC template by name ("rc_reasoning_v1") or a template file by path, and check its placeholders.

    Every variant needs each of `required`; the `later` variant also needs `{summary_field}`.
    """
    packaged = _packaged(name_or_path)
    if "/" not in name_or_path and packaged.is_file():
        name, text = name_or_path, packaged.read_text(encoding="utf-8")
    elif Path(name_or_path).expanduser().is_file():
        path = Path(name_or_path).expanduser()
        name, text = path.stem, path.read_text(encoding="utf-8")
    else:
        raise ValueError(f"RC prompt {name_or_path!r} is neither a packaged template (rc_reasoning_v1, rc_summary_v1) "
                         "nor an existing file; set the prompt to one of those names or to a template path.")
    first, sep, later = text.partition(f"\n{VARIANT_MARKER}\n")
    later = later if sep else first
    allowed = {*required, summary_field}
    problems = [f"the {label} variant lacks {{{field}}}" for label, variant in (("first", first), ("later", later))
                for field in (*required, *((summary_field,) if label == "later" else ()))
                if f"{{{field}}}" not in variant]
    problems += [f"{{{field}}} cannot be filled here (allowed: {sorted(allowed)})"
                 for field in sorted(set(_PLACEHOLDER.findall(text)) - allowed)]
    if problems:
        raise ValueError(f"RC prompt {name_or_path!r}: " + "; ".join(problems) + ".")
    return RCPrompt(name, make_prompt(name, text).version, first.strip(), later.strip())


def thinking_text(attempt: str, split: Literal["last", "first"] = "last") -> str:
    """What the summarizer reads of an attempt: its text before the last (or first) `</think>`, all of it when there
    is none.

    >>> thinking_text("<think>\\nTry n = 2.\\n</think>\\n\\nProof. Done.")
    'Try n = 2.'
    >>> thinking_text("<think>a</think>b</think>c"), thinking_text("<think>a</think>b</think>c", split="first")
    ('a</think>b', 'a')
    >>> thinking_text("Still going, no end tag")
    'Still going, no end tag'
    """
    head, sep, _ = attempt.rpartition(THINK_CLOSE) if split == "last" else attempt.partition(THINK_CLOSE)
    text = (head if sep else attempt).strip()
    return text[len(THINK_OPEN):].strip() if text.startswith(THINK_OPEN) else text


def summary_text(output: str) -> str:
    """The new summary in a summarizer's output: after its last `</think>` (a thinking model), else all of it.

    >>> summary_text("<think>plan</think>\\n\\nI tried induction.")
    'I tried induction.'
    >>> summary_text("  I tried induction.  ")
    'I tried induction.'
    """
    proof = extract_proof(output)
    return output.strip() if proof is None else proof


# -- records -------------------------------------------------------------------------------------------------------


@dataclass
class RCState:
    """One RC state: the summary it carries ("" for s_0) and the exact reasoning prompt it gives the policy."""

    cycle: int
    summary: str
    prompt_text: str
    prompt_ids: list[int]


@dataclass
class RCTrajectory:
    """One problem's run: states s_0..s_K, K attempts (attempt k answers state k), the summarizer outputs (None
    where no summary was made), the final proof (after the last `</think>` of the last attempt; None when it never
    closed its thinking), and every token generated for the problem (policy and summarizer)."""

    problem: str
    states: list[RCState]
    attempts: list[Completion]
    summaries: list[Completion | None]
    final_proof: str | None
    tokens: int


# -- the loop ------------------------------------------------------------------------------------------------------


class ReasoningCache:
    """The RC loop over a batch of problems (see the module docstring).

    Args:
        cycles: reasoning attempts per problem (K); a run has K+1 states.
        reasoning_prompt / summary_prompt: packaged template names or template paths.
        summarizer: a separate (frozen) engine for the summaries; None = the policy summarizes itself with the
            engine and tokenizer given to `run`.
        summarizer_tokenizer: tokenizer folder or hub id of the separate summarizer (its chat template); None = the
            policy's tokenizer.
        summarizer_sampling: the summarizer's sampling (paper: T 0.7, top_p 0.8, top_k 20, 2,048 tokens); without
            seeds of its own it derives them from the policy's sampling seeds.
        summary_input_split: the summarizer reads an attempt's thinking up to its "last" `</think>` (ours) or its
            "first" (the reference's split).
    """

    def __init__(
        self,
        cycles: int = 3,
        reasoning_prompt: str = "rc_reasoning_v1",
        summary_prompt: str = "rc_summary_v1",
        summarizer: RolloutEngine | None = None,
        summarizer_tokenizer: str | None = None,
        summarizer_sampling: SamplingConfig = SUMMARIZER_SAMPLING,
        summary_input_split: Literal["last", "first"] = "last",
    ) -> None:
        if cycles < 1:
            raise ValueError(f"RC cycles must be >= 1, got {cycles}")
        self.cycles = cycles
        self.reasoning_prompt = load_rc_prompt(reasoning_prompt, ("problem",), "summary")
        self.summary_prompt = load_rc_prompt(summary_prompt, ("problem", "latest"), "existing_summary")
        self.summarizer = summarizer
        self.summarizer_tokenizer_path = summarizer_tokenizer
        self.summarizer_sampling = summarizer_sampling
        self.summary_input_split = summary_input_split
        self._summarizer_tokenizer = None
        self.timings: dict[str, float] = {"reason_s": 0.0, "summarize_s": 0.0}

    def state(self, problem: str, summary: str, cycle: int, tokenizer) -> RCState:
        """State `cycle` of `problem` carrying `summary`: its reasoning prompt, rendered and tokenized."""
        text = self.reasoning_prompt.render(bool(summary), problem=problem, summary=summary)
        return RCState(cycle, summary, text, chat_prompt_ids(tokenizer, text))

    def summary_prompt_text(self, problem: str, existing_summary: str, attempt: str) -> str:
        return self.summary_prompt.render(bool(existing_summary), problem=problem, existing_summary=existing_summary,
                                          latest=thinking_text(attempt, self.summary_input_split))

    def _summarizer(self, engine: RolloutEngine, tokenizer):
        if self.summarizer is None:
            return engine, tokenizer
        if self.summarizer_tokenizer_path is None:
            return self.summarizer, tokenizer
        if self._summarizer_tokenizer is None:
            from transformers import AutoTokenizer

            self._summarizer_tokenizer = AutoTokenizer.from_pretrained(self.summarizer_tokenizer_path)
        return self.summarizer, self._summarizer_tokenizer

    def _summary_sampling(self, sampling: SamplingConfig, cycle: int, n: int) -> SamplingConfig:
        """The summaries' sampling: the summarizer's own, seeded from its own seeds if it has some, else from the
        policy's; a random stream apart from every reasoning call."""
        own = self.summarizer_sampling
        if own.seed is None and own.seeds is None:
            own = SamplingConfig(own.temperature, own.top_p, own.top_k, own.max_new_tokens, sampling.seed,
                                 sampling.seeds)
        return derive_sampling(own, "summary", cycle, indices=range(n))

    def _summarize(self, problems: list[str], states, attempts, engine, tokenizer, sampling: SamplingConfig,
                   cycle: int) -> list[Completion]:
        texts = [self.summary_prompt_text(p, s[-1].summary, a[-1].text)
                 for p, s, a in zip(problems, states, attempts, strict=True)]
        outs = engine.generate([chat_prompt_ids(tokenizer, t) for t in texts],
                               self._summary_sampling(sampling, cycle, len(texts)))
        return [out for (out,) in outs]

    def run(self, problems: list[str], engine: RolloutEngine, tokenizer, sampling: SamplingConfig,
            summarize_last: bool = True) -> list[RCTrajectory]:
        """Run K cycles on every problem, batched per cycle; `summarize_last=False` skips the last summary (and so
        state s_K), which only training reads."""
        if not problems:
            return []
        sum_engine, sum_tokenizer = self._summarizer(engine, tokenizer)
        states = [[self.state(p, "", 0, tokenizer)] for p in problems]
        attempts: list[list[Completion]] = [[] for _ in problems]
        summaries: list[list[Completion | None]] = [[] for _ in problems]
        self.timings = {"reason_s": 0.0, "summarize_s": 0.0}
        for k in range(self.cycles):
            t0 = time.perf_counter()
            cycle_sampling = derive_sampling(sampling, "cycle", k, indices=range(len(problems)))
            groups = engine.generate([s[-1].prompt_ids for s in states], cycle_sampling)
            t1 = time.perf_counter()
            self.timings["reason_s"] += t1 - t0
            for i, (attempt,) in enumerate(groups):
                attempts[i].append(attempt)
            if k == self.cycles - 1 and not summarize_last:
                for made in summaries:
                    made.append(None)
                break
            outs = self._summarize(problems, states, attempts, sum_engine, sum_tokenizer, sampling, k)
            self.timings["summarize_s"] += time.perf_counter() - t1
            for i, out in enumerate(outs):
                summaries[i].append(out)
                states[i].append(self.state(problems[i], summary_text(out.text), k + 1, tokenizer))
        return [
            RCTrajectory(problem=p, states=s, attempts=a, summaries=m, final_proof=extract_proof(a[-1].text),
                         tokens=sum(len(c.completion_ids) for c in (*a, *(x for x in m if x is not None))))
            for p, s, a, m in zip(problems, states, attempts, summaries, strict=True)
        ]


def run_reasoning_cache(
    problems: list[str],
    engine: RolloutEngine,
    tokenizer,
    sampling: SamplingConfig,
    cycles: int = 3,
    summarizer: RolloutEngine | None = None,
    summarizer_tokenizer: str | None = None,
    summarizer_sampling: SamplingConfig = SUMMARIZER_SAMPLING,
    reasoning_prompt: str = "rc_reasoning_v1",
    summary_prompt: str = "rc_summary_v1",
    summarize_last: bool = False,
    summary_input_split: Literal["last", "first"] = "last",
) -> list[RCTrajectory]:
    """The test-time RC scaffold: `cycles` attempts per problem, the model summarizing itself unless a `summarizer`
    is given; each trajectory's answer is `final_proof`. The summary of the last attempt is skipped by default (so
    the trajectories hold K states s_0..s_{K-1} and `summaries[-1]` is None): nothing reads it at test time."""
    cache = ReasoningCache(cycles, reasoning_prompt, summary_prompt, summarizer, summarizer_tokenizer,
                           summarizer_sampling, summary_input_split)
    return cache.run(problems, engine, tokenizer, sampling, summarize_last=summarize_last)
