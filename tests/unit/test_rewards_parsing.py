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
    rubric_total,
    strip_self_evaluation,
)
from qed_lightning.rewards import cache, parsing, rubric, templates
from qed_lightning.rewards.templates import make_prompt
from qed_lightning.testing.judge_rules import PROOF_END, PROOF_START, proof_section


@pytest.mark.parametrize("module", [parsing, rubric, templates, cache])
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


PLAIN_RUBRIC = """## Checkpoints (7 pts total)
- **2 pts**: Reduces to the case $n$ odd.
- **1 pt**: Checks $n = 1$.
- **4 pts**: Proves the bound $f(n) \\le n^2$.

## Zero-credit items
- Restating the problem.

## Deductions
- **-1 pt**: arithmetic slip.
- **2 pts**: this line is outside the checkpoint section and must not count.
"""

CHAIN_RUBRIC = """1. **Checkpoints (7 pts total)**
**Score exactly one chain: take the maximum subtotal among chains; do not add points across chains.**
- **1 pt**: Sets up notation common to both approaches.

**Chain A (induction)**
- **2 pts**: Base case and hypothesis.
- **3 pts**: Inductive step.

**Chain B (generating functions)**
- **4 pts**: Closed form of the generating function.
- **2 pts**: Extracts the coefficient.

2. **Zero-credit items**
- Conjecturing the answer without proof.
3. **Deductions**
- **-2**: missing the case $n = 0$.
"""


def test_rubric_total_plain():
    assert rubric_total(PLAIN_RUBRIC) == 2 + 1 + 4


def test_rubric_total_chains_take_the_max_not_the_sum():
    # common 1 + max(chain A 2+3=5, chain B 4+2=6) = 7 (the sum over chains would be 12)
    assert rubric_total(CHAIN_RUBRIC) == 7


def test_rubric_total_heading_chains():
    text = "## Checkpoints\n### Chain A\n- **3 pts**: x\n- **2 pts**: y\n### Chain B\n- **7 pts**: z\n## Deductions\n"
    assert rubric_total(text) == 7  # max(5, 7)


def test_rubric_total_errors_name_the_problem():
    with pytest.raises(ValueError, match="no checkpoint section"):
        rubric_total("## Marking\n- **7 pts**: everything")
    with pytest.raises(ValueError, match="no checkpoint items"):
        rubric_total("## Checkpoints\nGive points generously.\n## Deductions\n")


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
    assert proof_section(bench_prompt.render(problem="p", reference_solution="s", guidelines="g", proof="Q.E.D.")) == "Q.E.D."


def test_prompt_version_is_name_and_short_sha(tmp_path):
    packaged = load_prompt("rubric_v1")
    assert packaged.version == f"rubric_v1@{packaged.sha[:8]}" and len(packaged.sha) == 64
    custom = tmp_path / "my_judge.txt"
    custom.write_text(packaged.text + "\nBe strict.", encoding="utf-8")
    mine = load_prompt(str(custom))
    assert mine.name == "my_judge" and mine.version != packaged.version and mine.version.startswith("my_judge@")
    with pytest.raises(ValueError, match="neither a packaged template"):
        load_prompt("rubric_v9")


def test_every_sample_rubric_totals_seven(samples_dir):
    import json

    path = samples_dir / "fineproofs_rl.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    rubrics = [json.loads(line)["rubrics"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert rubrics and [rubric_total(r) for r in rubrics] == [7] * len(rubrics)
    # Chains count by their maximum: at least one sample would exceed 7 if the chains were summed.
    assert any("**Chain B" in r for r in rubrics)
