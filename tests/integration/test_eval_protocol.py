"""The paper's evaluation protocol in the shipped eval configs, and a judge prompt file used verbatim through `qed-eval`
(a reference-style file with its own placeholder names, mapped with `placeholders`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qed_lightning.eval.cli import make_evaluator, run
from qed_lightning.rewards import ProofBenchJudge, RubricJudge
from qed_lightning.testing.judge_rules import proof_section

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("config", "judge"), [("imo_proofbench", ProofBenchJudge), ("proofbench", RubricJudge)])
def test_eval_configs_carry_the_papers_protocol(config, judge, monkeypatch, tmp_path):
    monkeypatch.setenv("QED_GRADER_URL", "https://grader.invalid/v1beta/openai")
    # the model's own generation config decides the sampling, as in the reference's released evaluation config
    # (Qwen3-4B-Thinking-2507's values; only that file is needed to build the evaluator)
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.95,
                                                              "top_k": 20}))
    _, evaluator, _ = make_evaluator(["--config", str(REPO / f"configs/eval/{config}.yaml"), "--output_dir",
                                      str(tmp_path / "out"), "--model", str(model)])
    assert isinstance(evaluator.judge, judge)
    client = evaluator.judge.client
    assert (client.model_name, client.base_url, client.api_key_env) == (
        "gemini-3-pro-preview", "https://grader.invalid/v1beta/openai", "GEMINI_API_KEY")
    assert (client.max_tokens, client.max_concurrency) == (130_000, 32)
    sampling = evaluator.sampling
    assert (sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (229_376, 0.6, 0.95, 20)
    assert evaluator.engine.max_model_len == 229_376 + 32_768
    if judge is ProofBenchJudge:  # the 0/1/6/7 bands: a reply of 3 out of 7 counts as the partial-credit 1
        assert evaluator.judge.banding and evaluator.judge.parse("<points>3 out of 7</points>") == 1
        assert evaluator.judge.parse("<points>6 out of 7</points>") == 6


# A grading prompt written with the reference's placeholder names, LaTeX braces and spacing that must survive as is.
REFERENCE_STYLE = """Grade strictly: $\\frac{a}{b}$ stays, and so do {braces} and {{doubled}} ones.
**PROBLEM STATEMENT**
{problem_statement}
**GROUND-TRUTH SOLUTION**
{solution}
**SPECIFIC GRADING GUIDELINES**
{guidelines}
=== Proof Solution ===
{student_answer}
=== End of Proof Solution ===
Answer with <points>N out of 7</points>.   
"""


def test_a_prompt_file_is_used_verbatim(tiny_model_dir, tmp_path, judge_servers):
    template = tmp_path / "reference_grader.txt"
    template.write_text(REFERENCE_STYLE, encoding="utf-8")
    aliases = {"problem_statement": "problem", "solution": "reference_solution", "student_answer": "proof"}
    summary = run(["--config", str(REPO / "configs/eval/demo.yaml"), "--model", str(tiny_model_dir),
                   "--output_dir", str(tmp_path / "out"), "--n", "1", "--max_new_tokens", "8",
                   "--benchmark.init_args.limit", "1", "--engine", "qed_lightning.rollout.HFEngine",
                   "--judge.init_args.prompt", str(template), "--judge.init_args.placeholders", json.dumps(aliases)])
    assert summary["this_run"]["judge/ok"] == 1 and summary["judge"].split("|")[2].startswith("reference_grader@")
    ((path, body),) = [b for server in judge_servers for b in server.bodies]
    sent = body["messages"][-1]["content"]
    row = json.loads((REPO / "data/samples/imo_proofbench.jsonl").read_text().splitlines()[0])
    head, tail = REFERENCE_STYLE.split("{student_answer}")
    expected_head = (head.replace("{problem_statement}", row["problem"]).replace("{solution}", row["solution"])
                     .replace("{guidelines}", row["grading_guidelines"]))
    assert sent.startswith(expected_head) and sent.endswith(tail)  # every character of the file, trailing spaces too
    proof = proof_section(sent)
    sample = json.loads((tmp_path / "out" / "samples.jsonl").read_text().splitlines()[0])
    assert proof and proof in sample["output"]  # the proof slot holds the policy's response
