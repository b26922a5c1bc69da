"""Scaffolds on a scripted engine: batching (one engine call per step for all problems), token accounting, and the
generate-verify-refine loop's rounds and early stop."""

from __future__ import annotations

import pytest
from fakes import FakeEngine, FakeTokenizer

from qed_lightning.eval.scaffolds import DirectScaffold, GenerateVerifyRefine, ReasoningCacheScaffold
from qed_lightning.rollout.base import SamplingConfig

SAMPLING = SamplingConfig(temperature=0.8, max_new_tokens=64, seed=0)


def _kind(text: str) -> str:
    if text.startswith("You are checking a proof"):
        return "verify"
    if "### EARLIER ATTEMPT" in text:
        return "refine"
    if "### PROBLEM" in text and "### EXISTING SUMMARY" in text:
        return "summarize"
    if "### PROBLEM" in text:
        return "reason"
    return "generate"


def test_direct_is_one_batched_call_with_its_tokens():
    tok = FakeTokenizer()
    engine = FakeEngine(tok, lambda text: ("<think>t</think>Proof of " + text[-3:], 11, "stop"))
    outs = DirectScaffold().run(["P1.", "P2.", "P1."], engine, tok, SAMPLING)
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 3
    assert engine.calls[0][0] == "Generate a rigorous proof to the following question:\n\nP1."
    assert [o.tokens for o in outs] == [11, 11, 11] and [o.calls for o in outs] == [1, 1, 1]
    assert outs[1].response == "<think>t</think>Proof of P2." and not outs[1].truncated


def _gvr_engine(tok: FakeTokenizer, self_grades: dict[str, list[int]]) -> FakeEngine:
    """Problem "A" is self-graded 7 at once; "B" gets 1, then 7 after one refinement; "C" never closes its thinking
    in the first attempt, then is always self-graded 1. Token counts: generate 10, verify 5, refine 20."""
    def reply(text: str):
        kind = _kind(text)
        problem = "A" if "Problem A" in text else "B" if "Problem B" in text else "C"
        if kind == "generate":
            if problem == "C":
                return ("<think>unfinished", 10, "length")
            return (f"<think>x</think>{problem} draft", 10, "stop")
        if kind == "verify":
            grade = self_grades[problem].pop(0)
            return (f"<think>check</think>Critique of {problem}. <points>{grade} out of 7</points>", 5, "stop")
        return (f"<think>y</think>{problem} revised", 20, "stop")
    return FakeEngine(tok, reply)


def test_generate_verify_refine_stops_at_full_marks_and_counts_every_token():
    tok = FakeTokenizer()
    engine = _gvr_engine(tok, {"A": [7], "B": [1, 7], "C": [1, 1]})
    outs = GenerateVerifyRefine(rounds=3).run(["Problem A", "Problem B", "Problem C"], engine, tok, SAMPLING)
    kinds = [[_kind(t) for t in call] for call in engine.calls]
    # generate all; verify A and B (C has no proof to check); refine B and C; verify B, C; refine C; verify C; refine C
    assert kinds == [["generate"] * 3, ["verify"] * 2, ["refine"] * 2, ["verify"] * 2, ["refine"], ["verify"],
                     ["refine"]]
    a, b, c = outs
    assert (a.response, a.tokens, a.calls) == ("<think>x</think>A draft", 10 + 5, 2)
    assert (b.response, b.tokens, b.calls) == ("<think>y</think>B revised", 10 + 5 + 20 + 5, 4)
    assert [t["self_grade"] for t in b.trace] == [1, 7]
    # C: generate 10, round 1 no check (no proof) + refine 20, rounds 2 and 3: verify 5 + refine 20 each
    assert (c.tokens, c.calls) == (10 + 20 + 2 * (5 + 20), 6)
    assert [t["self_grade"] for t in c.trace] == [None, 1, 1]
    assert c.trace[0]["critique"].startswith("(The earlier attempt ran out of space")
    assert c.trace[1]["critique"] == "Critique of C. <points>1 out of 7</points>"
    refine_prompt = engine.calls[2][1]
    assert "### CRITIQUE\n(The earlier attempt ran out" in refine_prompt and "Problem C" in refine_prompt


def test_generate_verify_refine_with_zero_rounds_is_direct():
    tok = FakeTokenizer()
    engine = _gvr_engine(tok, {})
    outs = GenerateVerifyRefine(rounds=0).run(["Problem A"], engine, tok, SAMPLING)
    assert len(engine.calls) == 1 and outs[0].tokens == 10
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        GenerateVerifyRefine(rounds=-1)


def test_reasoning_cache_scaffold_runs_the_rc_loop_batched():
    tok = FakeTokenizer()

    def reply(text: str):
        if _kind(text) == "summarize":
            return ("I tried a parity argument.", 4, "stop")
        return ("<think>reasoning</think>Final proof.", 12, "stop")

    engine = FakeEngine(tok, reply)
    outs = ReasoningCacheScaffold(cycles=3).run(["Problem A", "Problem B"], engine, tok, SAMPLING)
    kinds = [[_kind(t) for t in call] for call in engine.calls]
    # 3 reasoning calls for both problems at once; 2 summaries between them (the last one is skipped at test time)
    assert kinds == [["reason"] * 2, ["summarize"] * 2, ["reason"] * 2, ["summarize"] * 2, ["reason"] * 2]
    assert outs[0].response == "<think>reasoning</think>Final proof."
    assert outs[0].tokens == 3 * 12 + 2 * 4 and outs[0].calls == 5
    assert [t["summary"] for t in outs[0].trace] == ["I tried a parity argument.", "I tried a parity argument.", None]
    assert "I tried a parity argument." in engine.calls[2][0]  # the second cycle reasons from the summary


def test_a_self_summarizing_policy_gets_room_to_close_its_thinking_before_the_summary():
    """A thinking model summarizing itself thinks first: its summary budget is the generation budget (64 here), not
    the instruct summarizer's 2,048, unless set; a separate summarizer keeps 2,048."""
    tok = FakeTokenizer()
    budgets: list[tuple[str, int]] = []

    class Recording(FakeEngine):
        def generate(self, prompts, sampling, n=1):
            budgets.extend((_kind(tok.text_of(p)), sampling.max_new_tokens) for p in prompts[:1])
            return super().generate(prompts, sampling, n)

    def reply(text: str):
        return ("<think>what did I try</think>I tried parity.", 9, "stop")

    ReasoningCacheScaffold(cycles=2).run(["Problem A"], Recording(tok, reply), tok, SAMPLING)
    assert budgets == [("reason", 64), ("summarize", 64), ("reason", 64)]
    budgets.clear()
    ReasoningCacheScaffold(cycles=2, summary_max_new_tokens=16).run(["Problem A"], Recording(tok, reply), tok, SAMPLING)
    assert budgets[1] == ("summarize", 16)
    budgets.clear()
    policy, summarizer = Recording(tok, reply), Recording(tok, reply)
    ReasoningCacheScaffold(cycles=2, summarizer=summarizer).run(["Problem A"], policy, tok, SAMPLING)
    assert budgets[1] == ("summarize", 2048)  # the paper's instruct summarizer
    with pytest.raises(ValueError, match="summary_max_new_tokens must be >= 1"):
        ReasoningCacheScaffold(summary_max_new_tokens=0)
