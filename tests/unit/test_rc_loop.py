"""The reasoning-cache loop with scripted engines: prompt assembly, thinking extraction, batching, state sampling,
and grading against the original problem (no model: engines answer from the decoded prompt)."""

from __future__ import annotations

import doctest
import random
import re

import pytest
import torch

import qed_lightning.modules.rc_rl as rc_rl_module
import qed_lightning.rc.loop as loop_module
from qed_lightning.data.records import ProofProblem
from qed_lightning.modules import ReasoningCacheRLModule
from qed_lightning.modules.rc_rl import cycle_rewards, sample_state_indices, summary_metrics
from qed_lightning.rc import ReasoningCache, run_reasoning_cache
from qed_lightning.rewards import Grade, RubricJudge
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.seeds import derive_seed

from fakes import NoClient

P1 = r"Prove that $\frac{a}{b} + \frac{b}{a} \ge 2$ for positive reals {a, b}."
P2 = "Prove that there are infinitely many primes."
SAMPLING = SamplingConfig(temperature=0.8, max_new_tokens=64, seed=5)

FIRST_INSTRUCTIONS = ("Solve the problem from scratch. Reason step by step, check each claim before you rely on it, "
                      "and end with a complete and rigorous proof of the statement.")
LATER_INSTRUCTIONS = (
    "The summary above describes an earlier attempt at this problem. Improve on it: verify its argument and repair any "
    "gap you find, prove the result in a different way, try another strategy if the attempt stalled, or continue from "
    "where it stopped and finish it. Do not trust a step only because the summary states it. Reason step by step, and "
    "end with a complete and rigorous proof of the statement."
)
FIRST_SUMMARY_INSTRUCTIONS = (
    'Summarize the candidate solution above in at most two paragraphs of plain prose, without headings or lists, '
    'written in the first person as the solver ("I tried...", "I showed..."). Give a detailed account of the attempt: '
    "its overall strategy, the theorems and lemmas it used, the calculations and deductions it made, what it checked "
    "or verified and with what outcome, the steps that failed or remain unjustified, and where it stopped. The attempt "
    "may be unfinished; summarize the part that exists. Report only what the candidate solution contains: add no new "
    "reasoning, fix no mistakes, and do not solve the problem yourself. Write the summary and nothing else."
)
LATER_SUMMARY_INSTRUCTIONS = (
    "The latest candidate solution was written with the existing summary in hand. Write an updated summary of the "
    "work on this problem in at most two paragraphs of plain prose, without headings or lists, written in the first "
    'person as the solver ("I tried...", "I showed..."). Keep everything important from the existing summary, such as '
    "the results already established and the approaches that failed, and add a detailed account of the latest "
    "attempt: its strategy, the theorems and lemmas it used, the calculations and deductions it made, what it checked "
    "or verified and with what outcome, what failed or remains unjustified, and where it stopped. Make clear how the "
    "latest attempt relates to the earlier work: whether it verified it, repaired it, continued it or took another "
    "route. The attempt may be unfinished; summarize the part that exists. Report only what is written above: add no "
    "new reasoning, fix no mistakes, and do not solve the problem yourself. Write the summary and nothing else."
)


def _section(text: str, header: str) -> str:
    return re.search(rf"### {header}\n(.*?)(?:\n\n### |<\|im_end\|>|$)", text, re.S).group(1)


class _Scripted(RolloutEngine):
    """Answers each prompt with a text derived from it (sample j of a group of n > 1 ends with ' #j'); records every
    call's decoded prompts."""

    def __init__(self, tokenizer, finish: str = "stop") -> None:
        self.tokenizer = tokenizer
        self.finish = finish
        self.calls: list[list[str]] = []
        self.samplings: list[SamplingConfig] = []

    def answer(self, prompt: str) -> str:
        raise NotImplementedError

    def generate(self, prompts, sampling, n=1):
        texts = [self.tokenizer.decode(p) for p in prompts]
        self.calls.append(texts)
        self.samplings.append(sampling)
        out = []
        for ids, text in zip(prompts, texts, strict=True):
            group = []
            for j in range(n):
                answer = self.answer(text) + (f" #{j}" if n > 1 else "")
                done = self.tokenizer.encode(answer, add_special_tokens=False)
                group.append(Completion(list(ids), done, [-0.5] * len(done), self.finish, answer))
            out.append(group)
        return out

    def load_weights(self, named_tensors) -> None:
        raise AssertionError("a scripted engine never receives weights here")


class ScriptedPolicy(_Scripted):
    """'<think>\\nthinking about cycle N\\n</think>\\n\\nproof N', N = 1 + the cycle in the summary (0 without one)."""

    def answer(self, prompt: str) -> str:
        found = re.search(r"I summarized cycle (\d+)", _section(prompt, "SUMMARY OF PREVIOUS ATTEMPT"))
        n = 0 if found is None else int(found.group(1)) + 1
        return f"<think>\nthinking about cycle {n}\n</think>\n\nproof {n}"


class ScriptedSummarizer(_Scripted):
    """'I summarized cycle N: <latest>' where <latest> is the LATEST CANDIDATE SOLUTION section it received."""

    def answer(self, prompt: str) -> str:
        latest = _section(prompt, "LATEST CANDIDATE SOLUTION")
        cycle = re.search(r"cycle (\d+)", latest).group(1)
        return f"I summarized cycle {cycle}: {latest}"


class SelfSummarizingPolicy(ScriptedPolicy):
    """A thinking policy that also answers summary prompts:
    '<think>\\nplan\\n</think>\\n\\nI summarized cycle N: ...'."""

    def answer(self, prompt: str) -> str:
        if "### LATEST CANDIDATE SOLUTION" in prompt:
            return "<think>\nplan\n</think>\n\n" + ScriptedSummarizer.answer(self, prompt)
        return super().answer(prompt)


def _chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_doctests():
    for module in (loop_module, rc_rl_module):
        assert doctest.testmod(module).failed == 0


def test_reasoning_prompts_carry_the_latest_summary_only(tiny_tokenizer):
    policy, summarizer = ScriptedPolicy(tiny_tokenizer), ScriptedSummarizer(tiny_tokenizer)
    (traj,) = ReasoningCache(cycles=2, summarizer=summarizer).run([P1], policy, tiny_tokenizer, SAMPLING)

    assert [s.cycle for s in traj.states] == [0, 1, 2]
    assert traj.states[0].summary == ""
    assert traj.states[0].prompt_text == (
        "### PROBLEM\n"
        r"Prove that $\frac{a}{b} + \frac{b}{a} \ge 2$ for positive reals {a, b}." "\n\n"
        "### SUMMARY OF PREVIOUS ATTEMPT\n"
        "There is no previous attempt: this is the first time you work on this problem.\n\n"
        "### INSTRUCTIONS\n" + FIRST_INSTRUCTIONS
    )
    assert traj.states[1].summary == "I summarized cycle 0: thinking about cycle 0"
    assert traj.states[1].prompt_text == (
        "### PROBLEM\n"
        r"Prove that $\frac{a}{b} + \frac{b}{a} \ge 2$ for positive reals {a, b}." "\n\n"
        "### SUMMARY OF PREVIOUS ATTEMPT\n"
        "I summarized cycle 0: thinking about cycle 0\n\n"
        "### INSTRUCTIONS\n" + LATER_INSTRUCTIONS
    )
    # the summary of cycle 1 replaces that of cycle 0
    assert traj.states[2].prompt_text == (
        "### PROBLEM\n"
        r"Prove that $\frac{a}{b} + \frac{b}{a} \ge 2$ for positive reals {a, b}." "\n\n"
        "### SUMMARY OF PREVIOUS ATTEMPT\n"
        "I summarized cycle 1: thinking about cycle 1\n\n"
        "### INSTRUCTIONS\n" + LATER_INSTRUCTIONS
    )
    for state in traj.states:  # one chat-templated user turn with the generation prompt
        assert tiny_tokenizer.decode(state.prompt_ids) == _chat(state.prompt_text)
        text = state.prompt_text
        assert (text.index("### PROBLEM") < text.index("### SUMMARY OF PREVIOUS ATTEMPT")
                < text.index("### INSTRUCTIONS"))
    # attempt k answers state k
    assert [a.prompt_ids for a in traj.attempts] == [traj.states[0].prompt_ids, traj.states[1].prompt_ids]
    assert [a.text for a in traj.attempts] == ["<think>\nthinking about cycle 0\n</think>\n\nproof 0",
                                               "<think>\nthinking about cycle 1\n</think>\n\nproof 1"]
    assert traj.final_proof == "proof 1"
    expected_tokens = sum(len(c.completion_ids) for c in [*traj.attempts, *traj.summaries])
    assert traj.tokens == expected_tokens > 0


def test_the_summarizer_reads_only_the_thinking(tiny_tokenizer):
    policy, summarizer = ScriptedPolicy(tiny_tokenizer), ScriptedSummarizer(tiny_tokenizer)
    ReasoningCache(cycles=2, summarizer=summarizer).run([P2], policy, tiny_tokenizer, SAMPLING)
    (first,), (second,) = summarizer.calls
    assert first == _chat(
        "### PROBLEM\nProve that there are infinitely many primes.\n\n"
        "### EXISTING SUMMARY\nNone: the candidate solution below is the first attempt at this problem.\n\n"
        "### LATEST CANDIDATE SOLUTION\nthinking about cycle 0\n\n"
        "### INSTRUCTIONS\n" + FIRST_SUMMARY_INSTRUCTIONS
    )
    assert second == _chat(
        "### PROBLEM\nProve that there are infinitely many primes.\n\n"
        "### EXISTING SUMMARY\nI summarized cycle 0: thinking about cycle 0\n\n"
        "### LATEST CANDIDATE SOLUTION\nthinking about cycle 1\n\n"
        "### INSTRUCTIONS\n" + LATER_SUMMARY_INSTRUCTIONS
    )
    assert "proof" not in _section(second, "LATEST CANDIDATE SOLUTION")


def test_cycles_are_batched_over_problems(tiny_tokenizer):
    policy, summarizer = ScriptedPolicy(tiny_tokenizer), ScriptedSummarizer(tiny_tokenizer)
    trajectories = ReasoningCache(cycles=3, summarizer=summarizer).run([P1, P2, "Prove that 7 is odd."], policy,
                                                                       tiny_tokenizer, SAMPLING)
    assert [len(c) for c in policy.calls] == [3, 3, 3]  # one generate call per cycle, all problems in it
    assert [len(c) for c in summarizer.calls] == [3, 3, 3]
    assert [t.problem for t in trajectories] == [P1, P2, "Prove that 7 is odd."]
    assert [(len(t.states), len(t.attempts), len(t.summaries)) for t in trajectories] == [(4, 3, 3)] * 3
    assert all(P2 in text for text in (policy.calls[k][1] for k in range(3)))  # problem order kept in every call


def test_every_call_gets_its_own_seeds(tiny_tokenizer):
    policy, summarizer = ScriptedPolicy(tiny_tokenizer), ScriptedSummarizer(tiny_tokenizer)
    ReasoningCache(cycles=3, summarizer=summarizer).run([P1, P2], policy, tiny_tokenizer,
                                                      SamplingConfig(temperature=0.8, seeds=(11, 22)))
    seeds = [s.seeds for s in policy.samplings + summarizer.samplings]
    assert len({seed for pair in seeds for seed in pair}) == 12  # 3 reasoning + 3 summary calls x 2 problems
    # cycle k reasons with derive_seed(s, "cycle", k) of each problem's seed s
    assert policy.samplings[1].seeds == (derive_seed(11, "cycle", 1), derive_seed(22, "cycle", 1))
    assert policy.samplings[0].temperature == 0.8
    # the summarizer keeps its own sampling (the paper's defaults) and derives its seeds from the policy's
    first = summarizer.samplings[0]
    assert (first.temperature, first.top_p, first.top_k, first.max_new_tokens) == (0.7, 0.8, 20, 2048)
    assert first.seeds == (derive_seed(11, "summary", 0), derive_seed(22, "summary", 0))


def test_scaffold_summarizes_with_the_policy_and_skips_the_last_summary(tiny_tokenizer):
    policy = SelfSummarizingPolicy(tiny_tokenizer)
    trajectories = run_reasoning_cache([P1, P2], policy, tiny_tokenizer, SAMPLING, cycles=3)
    # reason, summarize, reason, summarize, reason: all through the policy's engine, 2 problems per call
    assert [len(c) for c in policy.calls] == [2] * 5
    assert ["LATEST CANDIDATE SOLUTION" in c[0] for c in policy.calls] == [False, True, False, True, False]
    traj = trajectories[0]
    assert len(traj.states) == 3 and traj.summaries[-1] is None
    # a thinking summarizer's summary is its text after </think>
    assert traj.states[1].summary == "I summarized cycle 0: thinking about cycle 0"
    assert traj.states[2].summary == "I summarized cycle 1: thinking about cycle 1"
    assert traj.final_proof == "proof 2"


def test_truncated_and_empty_summaries_are_counted(tiny_tokenizer):
    class EmptySummarizer(ScriptedSummarizer):
        def answer(self, prompt: str) -> str:
            return "  "

    policy = ScriptedPolicy(tiny_tokenizer)
    cache = ReasoningCache(cycles=2, summarizer=EmptySummarizer(tiny_tokenizer, finish="length"))
    (traj,) = cache.run([P2], policy, tiny_tokenizer, SAMPLING)
    # an empty summary sends the next state back to the from-scratch prompt
    assert traj.states[1].summary == "" and FIRST_INSTRUCTIONS in traj.states[1].prompt_text
    metrics = summary_metrics([traj], cache.timings)
    assert metrics["rc/summary_empty_frac"] == 1.0
    assert metrics["rc/summary_truncated_frac"] == 1.0
    assert metrics["rc/summarizer_s"] >= 0.0


def test_states_are_sampled_without_replacement_and_seeded():
    for num_states, m in [(4, 2), (4, 4), (3, 5), (1, 2)]:
        for seed in range(20):
            picked = sample_state_indices(num_states, m, random.Random(seed))
            assert len(picked) == len(set(picked)) == min(m, num_states)
            assert all(0 <= i < num_states for i in picked)
            assert picked == sample_state_indices(num_states, m, random.Random(seed))
    draws = {tuple(sample_state_indices(4, 2, random.Random(seed))) for seed in range(50)}
    assert len(draws) == 6  # every pair of the 4 states occurs


def test_cycle_rewards_and_improvement():
    # prompts of cycles [0, 2, 0, 1], G = 2: cycle 0 -> mean(1, 0, 0.5, 0.5) = 0.5; cycle 1 -> mean(1, 1) = 1.0;
    # cycle 2 -> 0.25 (its invalid sample is left out). improvement_1 = 1.0 - 0.5; improvement_2 = 0.25 - 1.0
    rewards = torch.tensor([1.0, 0.0, 0.25, 0.0, 0.5, 0.5, 1.0, 1.0])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    assert cycle_rewards([0, 2, 0, 1], rewards, valid, 2, "rc/") == {
        "rc/reward_cycle_0": 0.5, "rc/reward_cycle_1": 1.0, "rc/reward_cycle_2": 0.25,
        "rc/improvement_1": 0.5, "rc/improvement_2": -0.75,
    }


# -- the module: which states are trained on and what the judge sees -----------------------------------------------


class CapturingJudge(RubricJudge):
    """Records every GradeRequest; scores 7 for a sample of a group (the response ends with ' #j'), else 0."""

    def __init__(self) -> None:
        super().__init__(NoClient())
        self.requests = []

    def grade(self, requests):
        self.requests.extend(requests)
        return [Grade(7, 1.0, "ok") if re.search(r" #\d+$", r.response) else Grade(0, 0.0, "ok") for r in requests]


def _module(tiny_tokenizer, monkeypatch, **kwargs):
    policy = SelfSummarizingPolicy(tiny_tokenizer)
    module = ReasoningCacheRLModule("unused", engine=policy, judge=CapturingJudge(), group_size=3, cycles=3,
                                    states_per_trajectory=2, seed=1, **kwargs)
    module.tokenizer = tiny_tokenizer
    logged: list[dict] = []
    monkeypatch.setattr(module.policy_update, "run",
                        lambda rollouts, advantages, valid, loss_fn, progress=None: {"train/loss": 0.0})
    monkeypatch.setattr(module, "log_step", lambda metrics, batch_size: logged.append(metrics))
    return module, policy, logged


def _batch() -> list[ProofProblem]:
    return [ProofProblem(0, P1, "## Checkpoints (7 pts total)\n- **7 pts**: proof", "s"),
            ProofProblem(1, P2, "## Checkpoints (7 pts total)\n- **7 pts**: Euclid", "s")]


def test_training_step_grades_fresh_rollouts_of_sampled_states_against_the_original_problem(tiny_tokenizer,
                                                                                             monkeypatch):
    module, policy, logged = _module(tiny_tokenizer, monkeypatch)
    batch = _batch()
    module.training_step(batch, 0)

    # 3 cycles of RC reasoning and summarizing (the policy summarizes itself), then one call for every rollout
    assert len(policy.calls) == 7
    rollout_prompts = policy.calls[-1]
    assert len(rollout_prompts) == 2 * 2  # 2 problems x 2 states, G = 3 completions each
    requests = module.judge.requests
    assert len(requests) == 2 * 2 * 3
    assert [r.problem for r in requests] == [P1] * 6 + [P2] * 6  # the ORIGINAL statement, never the RC prompt
    assert [r.rubric for r in requests] == [batch[0].rubric] * 6 + [batch[1].rubric] * 6
    # the rollouts answered the exact reasoning prompts of two distinct states (of cycles 0..3) of each trajectory
    for i, problem in enumerate((P1, P2)):
        pair = rollout_prompts[2 * i: 2 * i + 2]
        assert all(_section(p, "PROBLEM") == problem for p in pair)
        cycles = [int(re.search(r"proof (\d) #0$", requests[6 * i + 3 * j].response).group(1)) for j in range(2)]
        assert len(set(cycles)) == 2 and set(cycles) <= {0, 1, 2, 3}
        assert [r.response[-2:] for r in requests[6 * i: 6 * i + 6]] == ["#0", "#1", "#2"] * 2
    seeds = policy.samplings[-1].seeds
    assert len(set(seeds)) == 4  # two states of one problem never share a seed
    (metrics,) = logged
    cycles = sorted(k for k in metrics if k.startswith("rc/reward_cycle_"))
    assert cycles and all(metrics[k] == 1.0 for k in cycles)
    assert metrics["rc/states"] == 4.0 and metrics["rc/replayed_frac"] == 0.0
    assert metrics["rollout/reward_mean"] == 1.0
    # the step's rollout records carry each one's RC state: its cycle, and the summary its prompt was built from
    records = module.last_rollouts
    assert len(records) == 12 and all(r["problem"] in (P1, P2) and not r["replayed"] for r in records)
    for r in records:
        assert f"proof {r['cycle']} #" in r["completion"] and (r["state"] == "") == (r["cycle"] == 0)
        assert r["state"] in r["prompt"]


def test_trajectory_turns_are_graded_only_when_asked(tiny_tokenizer, monkeypatch):
    module, _, logged = _module(tiny_tokenizer, monkeypatch, grade_trajectory_turns=True)
    module.training_step(_batch(), 0)
    turns = module.judge.requests[12:]  # after the 12 trained rollouts: the 2 x 3 attempts of the trajectories
    assert [r.problem for r in turns] == [P1] * 3 + [P2] * 3
    assert [r.response for r in turns[:3]] == [f"<think>\nthinking about cycle {k}\n</think>\n\nproof {k}"
                                               for k in range(3)]
    assert logged[0]["rc/turn_reward_cycle_0"] == 0.0 and "rc/turn_improvement_2" in logged[0]


def test_replay_buffer_feeds_later_steps_and_survives_a_checkpoint(tiny_tokenizer, monkeypatch):
    module, policy, logged = _module(tiny_tokenizer, monkeypatch, replay_size=5, replay_ratio=0.5)
    module.training_step(_batch(), 0)
    assert logged[0]["rc/replayed_frac"] == 0.0  # nothing from earlier steps yet
    assert len(module.replay) == 5  # 2 trajectories x 4 states, the oldest 3 dropped
    module.training_step(_batch(), 1)
    assert logged[1]["rc/replayed_frac"] == 0.5  # 2 of the 4 trained states came from the buffer
    assert len(policy.calls[-1]) == 4

    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    restored, _, _ = _module(tiny_tokenizer, monkeypatch, replay_size=5, replay_ratio=0.5)
    restored.on_load_checkpoint(checkpoint)
    assert restored.replay == module.replay and len(restored.replay) == 5


def test_config_errors_name_the_flags(tiny_tokenizer):
    with pytest.raises(ValueError, match="model.replay_size > 0") as info:
        ReasoningCacheRLModule("unused", engine=ScriptedPolicy(tiny_tokenizer), judge=CapturingJudge(),
                               replay_ratio=0.5, summarizer=ScriptedSummarizer(tiny_tokenizer))
    assert "model.summarizer_model" in str(info.value)


def test_the_summarizer_reads_up_to_the_last_or_the_first_think_close(tiny_tokenizer):
    attempt = "<think>\nfirst idea\n</think>\nmore thinking about cycle 0\n</think>\n\nproof 0"

    class TwoCloses(ScriptedPolicy):
        def answer(self, prompt: str) -> str:
            return attempt

    for split, latest in [("last", "first idea\n</think>\nmore thinking about cycle 0"), ("first", "first idea")]:
        summarizer = _Recorder(tiny_tokenizer)
        ReasoningCache(cycles=1, summarizer=summarizer, summary_input_split=split).run(
            [P2], TwoCloses(tiny_tokenizer), tiny_tokenizer, SAMPLING)
        assert _section(summarizer.calls[0][0], "LATEST CANDIDATE SOLUTION").strip() == latest


class _Recorder(_Scripted):
    def answer(self, prompt: str) -> str:
        return "I summarized cycle 0."


def test_the_stage3_judge_can_read_the_problem_inside_the_policy_prompt(tiny_tokenizer, monkeypatch):
    module, _, _ = _module(tiny_tokenizer, monkeypatch, judge_problem="policy_prompt")
    module.training_step(_batch(), 0)
    prefix = "Generate a rigorous proof to the following question:\n\n"
    assert [r.problem for r in module.judge.requests] == [prefix + P1] * 6 + [prefix + P2] * 6
