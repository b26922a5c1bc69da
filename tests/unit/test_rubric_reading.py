"""Reading a rubric's checkpoint total through the markup real rubrics use (`qed_lightning.data.rubric`).

Every expected total is added up by hand in the comment next to it; chains count by their maximum, never summed.
"""

from __future__ import annotations

import doctest
import json

import pytest

from qed_lightning.data import rubric
from qed_lightning.data.rubric import check_rubric, read_rubric, rubric_total, rubric_verified

TAIL = ("\n## Zero-credit items\n- Restating the problem.\n## Deductions\n- **-1**: arithmetic slip\n"
        "- **cap at 4/7**: circular")


def test_doctests():
    result = doctest.testmod(rubric)
    assert result.attempted > 0 and result.failed == 0


PLAIN = """## Checkpoints (7 pts total)
- **2 pts**: Reduces to the case $n$ odd.
- **1 pt**: Checks $n = 1$.
- **4 pts**: Proves the bound $f(n) \\le n^2$.

## Zero-credit items
- Restating the problem.

## Deductions
- **-1 pt**: arithmetic slip.
- **2 pts**: this line is outside the checkpoint section and must not count.
"""

CHAINS = """1. **Checkpoints (7 pts total)**
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

VARIANTS = {
    # 2 + 2 + 3 = 7: numbered items, bold points in parentheses before the text
    "numbered-bold-parens": "## Checkpoints\n1. **(2 pts)** Factors the polynomial.\n2. **(2 pts)** Bounds the root.\n"
                            "3. **(3 pts)** Concludes." + TAIL,
    # 3 + 4 = 7: points in parentheses after the text
    "parens-after": "### Checkpoints\n- Factors the polynomial (3 pts)\n- Concludes the proof (4 pts)" + TAIL,
    # 5 + 2 = 7: points in square brackets, "points" spelled out, and a "Total (max 7)" line that is no item
    "brackets": "#### Checkpoints\n* [5 points] Main lemma.\n* Finish [2 points]\n**Total (max 7)**" + TAIL,
    # 1 + 6 = 7: bare counts at the start of the item
    "bare-dash": "## Checkpoints\n- 1 pt: Setup.\n- 6 pts: The rest." + TAIL,
    # 2 + 5 = 7: "2 pt." abbreviated, under a bold numbered heading
    "bold-numbered-heading": "**1. Checkpoints**\n2 pt. Defines the invariant.\n5 pts. Shows it is preserved.\n"
                             "**2. Zero-credit items**\n- none",
    # 3 + 4 = 7: bare counts at the end after a dash; the sub-items of the 4-point item are its breakdown
    "breakdown": "# Checkpoints\n- Lemma - 3 pts\n- Main estimate - 4 pts\n  - (1 pt) for the case n even\n"
                 "  - (3 pts) for the case n odd" + TAIL,
    # 1 + max(2 + 4, 5) = 7: chains named Path 1 / Path 2, items with points after the text
    "paths": "## Checkpoints\n- Notation (1 pt)\n**Path 1 (induction)**\n- Base (2 pts)\n- Step (4 pts)\n"
             "**Path 2 (algebra)**\n- Identity (5 pts)" + TAIL,
    # 0 + max(7, 3 + 4) = 7: chains as headings "Approach (i)" / "Approach (ii)", with subtotals in the heading
    "approaches": "## Checkpoints\n### Approach (i) (max 7 pts)\n- **7 pts** Direct construction.\n"
                  "### Approach (ii)\n- **3 pts** Reduction.\n- **4 pts** Counting." + TAIL,
    # 1 + max(6, 6) = 7: the sample file's markup, Chain A / Chain B as bold lines
    "chains": "## Checkpoints (7 pts total)\n- **1 pt**: Reduces.\n\n**Chain A (binomial)**\n- **3 pts**: a\n"
              "- **3 pts**: b\n\n**Chain B (residues)**\n- **3 pts**: c\n- **2 pts**: d\n- **1 pt**: e" + TAIL,
}


@pytest.mark.parametrize("text", VARIANTS.values(), ids=VARIANTS.keys())
def test_markup_variants_read_to_seven(text):
    assert rubric_total(text) == 7
    assert check_rubric(text) is None and rubric_verified(text)


def test_plain_and_chain_rubrics():
    assert rubric_total(PLAIN) == 2 + 1 + 4  # the "2 pts" line under Deductions is outside the section
    assert rubric_total(CHAINS) == 1 + max(2 + 3, 4 + 2)  # the sum over chains would be 12
    heading_chains = ("## Checkpoints\n### Chain A\n- **3 pts**: x\n- **2 pts**: y\n### Chain B\n- **7 pts**: z\n"
                      "## Deductions\n")
    assert rubric_total(heading_chains) == max(3 + 2, 7)


def test_a_wrong_total_is_rejected_and_says_so():
    nine = VARIANTS["parens-after"].replace("(4 pts)", "(6 pts)")  # 3 + 6
    assert rubric_total(nine) == 9
    assert check_rubric(nine) == "rubric checkpoints total 9 points, expected 7 (chains count by their maximum)"
    assert check_rubric([{"title": "a", "points": 5, "desc": "x"}]) == "rubric items total 5 points, expected 7"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("Award 7 points for a complete proof, 3 for the lemma.", "no line names a 'Checkpoints' section"),
        ("## Checkpoints\nGive points generously for the lemma.\n## Deductions\n- **-1**: slip",
         "the checkpoint section has no item with a point count"),
    ],
    ids=["no-section", "no-items"],
)
def test_an_unreadable_total_is_kept_as_unverified(text, why):
    assert read_rubric(text).total is None and read_rubric(text).why_unread == why
    assert check_rubric(text) is None  # kept: the judge reads the rubric as text
    assert not rubric_verified(text)


def test_rubrics_that_are_not_text_are_named():
    assert check_rubric(5) == "expected a markdown string or a list of {title, points, description} items, got int"
    assert check_rubric("   ") == "empty string"
    assert "lacks description" in check_rubric([{"title": "a", "points": 7}])


def test_every_sample_rubric_totals_seven(samples_dir):
    rubrics = [json.loads(line)["rubrics"] for line in (samples_dir / "fineproofs_rl.jsonl").read_text().splitlines()
               if line.strip()]
    assert rubrics and [rubric_total(r) for r in rubrics] == [7] * len(rubrics)
    assert any("**Chain B" in r for r in rubrics)  # summing chains would exceed 7 on these
