"""Pure reward text functions: score parsing, proof extraction, banding, rubrics, prompt rendering.

Every expected value below is written out by hand from the rule in the function's docstring.
"""

from __future__ import annotations

import doctest

import pytest

from qed_lightning.rewards import (
    band_score,
    extract_proof,
    load_prompt,
    parse_points,
    parse_score,
    render_rubric,
    strip_self_evaluation,
)
from qed_lightning.rewards import cache, parsing, templates
from qed_lightning.rewards.templates import make_prompt
from qed_lightning.testing import judge_rules
from qed_lightning.testing.judge_rules import PROOF_END, PROOF_START, proof_section


@pytest.mark.parametrize("module", [parsing, templates, cache, judge_rules])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


# ---- parse_score ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("<score>7</score><assessment>complete</assessment><errors>none</errors>", 7),
        ("<score>0</score>", 0),
        ("<score> 4 \n</score>", 4),  # whitespace inside the tag
        ("<SCORE>5</SCORE>", 5),  # case-insensitive tag
        ("Draft: <score>2</score>. Re-checking lemma 3... final: <score>6</score>", 6),  # the last tag wins
        ("<score>8</score>", None),  # out of range
        ("<score>-1</score>", None),
        ("<score>3.5</score>", None),  # not an integer
        ("<score>seven</score>", None),
        ("<score></score>", None),
        ("The proof deserves 7 points.", None),  # no tag at all
        ("<score>5</score> then, revised: <score>9</score>", None),  # the final verdict is invalid: no fallback
        ("<score>5</score> and a dangling <score>6", 5),  # an unclosed tag is not a tag
        ("<score>5</score><score><score>2</score>", 2),  # nested opening: the complete pair is <score>2</score>
        ("<score>3</scor>", None),  # misspelt closing tag: no complete tag
    ],
)
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Minor gap in case 2.\n<points>6 out of 7</points>", 6),
        ("<points>0 out of 7</points>", 0),
        ("<points> 1  out  of 7 </points>", 1),
        ("<points>7 out of 7</points> ... on reflection <points>1 out of 7</points>", 1),
        ("<points>6/7</points>", None),
        ("<points>8 out of 7</points>", None),
        ("<points>6 out of 10</points>", None),
        ("<score>7</score>", None),
    ],
)
def test_parse_points(reply, expected):
    assert parse_points(reply) == expected


# ---- extract_proof, banding, self-evaluation -------------------------------------------------------------------
def test_extract_proof_takes_text_after_the_last_think_close():
    assert extract_proof("<think>plan</think>draft</think>\n\nFinal proof.\n") == "Final proof."
    assert extract_proof("<think>a</think>Proof: n = 2k.") == "Proof: n = 2k."
    assert extract_proof("<think>never closed, ran out of tokens") is None
    assert extract_proof("no thinking block at all") is None
    assert extract_proof("<think>x</think> \n ") == ""


def test_band_score_maps_onto_the_imo_scale():
    assert [band_score(s) for s in range(8)] == [0, 1, 1, 1, 1, 1, 6, 7]
    with pytest.raises(ValueError, match="0..7"):
        band_score(8)


@pytest.mark.parametrize(
    ("proof", "expected"),
    [
        ("Proof. A.\n\n## Self Evaluation\nScore: 7/7", "Proof. A."),
        ("Proof. A.\n\n### Self-evaluation of the proof\nAll steps verified.", "Proof. A."),
        ("Proof. A.\n**Self-Assessment:** I am confident.\nMore.", "Proof. A."),
        ("Proof. A.\n\n**Verification of the proof**\nEach step holds.", "Proof. A."),
        ("Proof. A.\n## Evaluation\n7", "Proof. A."),
        # Conservative: ordinary proof text that merely uses the words is kept.
        ("Evaluation of the sum gives 3.\nHence done.", "Evaluation of the sum gives 3.\nHence done."),
        ("Proof.\n## Evaluation of the integral\nIt equals 1.", "Proof.\n## Evaluation of the integral\nIt equals 1."),
        ("We verify the proof of Lemma 2 below.\nDone.", "We verify the proof of Lemma 2 below.\nDone."),
        # Never strips the whole proof.
        ("## Self Evaluation\nonly this", "## Self Evaluation\nonly this"),
    ],
)
def test_strip_self_evaluation(proof, expected):
    assert strip_self_evaluation(proof) == expected


# ---- rubrics ---------------------------------------------------------------------------------------------------
def test_render_rubric_list_form_exact():
    items = [
        {"title": "Invariant", "points": 3, "description": "Shows $a_n \\equiv 1 \\pmod{4}$."},
        {"title": "Conclusion", "points": 4, "desc": "Derives the contradiction."},
    ]
    expected = (
        "# Invariant (3 points)\nDescription: Shows $a_n \\equiv 1 \\pmod{4}$.\n\n"
        "# Conclusion (4 points)\nDescription: Derives the contradiction."
    )
    assert render_rubric(items) == expected


def test_render_rubric_markdown_is_stripped_and_bad_items_are_named():
    assert render_rubric("\n  ## Checkpoints\n- **7 pts**: all\n\n") == "## Checkpoints\n- **7 pts**: all"
    with pytest.raises(ValueError, match=r"rubric item 1 lacks description \(or desc\)"):
        render_rubric([{"title": "a", "points": 1, "desc": "x"}, {"title": "b", "points": 6}])


# ---- prompt templates ------------------------------------------------------------------------------------------
def test_render_keeps_latex_braces_and_substitutes_once():
    prompt = make_prompt("t", "P: {problem}\nR: {rubric}\nS: {proof}")
    problem = r"Prove $\frac{a^{2}}{b} \ge \{x\}$ for all $x \in \mathbb{R}$."
    proof = r"Let $S = \{ {rubric} \}$; by $\sum_{i=1}^{n}$ ... {problem}"
    rendered = prompt.render(problem=problem, rubric="- **7 pts**: all", proof=proof)
    assert rendered == f"P: {problem}\nR: - **7 pts**: all\nS: {proof}"


def test_render_requires_every_placeholder_of_the_template():
    prompt = make_prompt("t", "{problem} {proof}")
    with pytest.raises(ValueError, match=r"needs values for \['proof'\]"):
        prompt.render(problem="p")


def test_packaged_prompts_have_their_placeholders_and_proof_markers():
    rubric_prompt = load_prompt("rubric_v1")
    bench_prompt = load_prompt("imo_proofbench_v1")
    assert rubric_prompt.placeholders == {"problem", "rubric", "proof"}
    assert bench_prompt.placeholders == {"problem", "reference_solution", "guidelines", "proof"}
    assert "<score>" in rubric_prompt.text and "<points>" not in rubric_prompt.text
    assert "<points>N out of 7</points>" in bench_prompt.text
    # The scripted judge server finds the proof between these markers in both templates.
    rendered = rubric_prompt.render(problem="p", rubric="r", proof="THE PROOF {x}")
    assert PROOF_START in rendered and PROOF_END in rendered
    assert proof_section(rendered) == "THE PROOF {x}"
    rendered_bench = bench_prompt.render(problem="p", reference_solution="s", guidelines="g", proof="Q.E.D.")
    assert proof_section(rendered_bench) == "Q.E.D."


def test_prompt_version_is_name_and_short_sha(tmp_path):
    packaged = load_prompt("rubric_v1")
    assert packaged.version == f"rubric_v1@{packaged.sha[:8]}" and len(packaged.sha) == 64
    custom = tmp_path / "my_judge.txt"
    custom.write_text(packaged.text + "\nBe strict.", encoding="utf-8")
    mine = load_prompt(str(custom))
    assert mine.name == "my_judge" and mine.version != packaged.version and mine.version.startswith("my_judge@")
    with pytest.raises(ValueError, match="neither a packaged template"):
        load_prompt("rubric_v9")


def test_a_reference_style_template_runs_unchanged_through_aliases(tmp_path):
    text = "Problem: {problem}\nScheme: {marking_scheme}\nProof: {solution}\n$\\frac{a}{b}$ {other}"
    aliases = {"marking_scheme": "rubric", "solution": "proof"}
    prompt = make_prompt("v1ref", text, aliases)
    assert prompt.placeholders == {"problem", "rubric", "proof"}
    assert prompt.render(problem="P", rubric="R", proof="{problem}") == \
        "Problem: P\nScheme: R\nProof: {problem}\n$\\frac{a}{b}$ {other}"
    assert prompt.version != make_prompt("v1ref", text).version  # the aliases change what the judge reads
    with pytest.raises(ValueError, match=r"unknown fields \['answer'\]"):
        make_prompt("x", "{a}", {"a": "answer"})


def test_the_first_verdict_option_reads_the_first_tag_and_keys_its_own_cache(tmp_path):
    from qed_lightning.rewards import RubricJudge
    from qed_lightning.rewards.clients import JudgeClient

    class _Client(JudgeClient):
        model_name = "none"

        async def complete(self, prompt):
            return ""

    path = tmp_path / "v1.md"
    path.write_text("{problem} {marking_scheme} === Proof Solution ===\n{solution}\n=== End of Proof Solution ===")
    first = RubricJudge(_Client(), prompt=str(path), placeholders={"marking_scheme": "rubric", "solution": "proof"},
                        verdict="first")
    last = RubricJudge(_Client(), prompt=str(path), placeholders={"marking_scheme": "rubric", "solution": "proof"})
    reply = "<score>2</score> on reflection <score>5</score>"
    assert (first.parse(reply), last.parse(reply)) == (2, 5)
    assert first.prompt.version == last.prompt.version + "+first"
