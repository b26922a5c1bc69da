"""Pure text functions of the reward side: what is graded, and how a judge's reply becomes a score (SPEC 4, 6).

Paper's choice (reference implementation): only the text after the last `</think>` is graded; a rollout without
`</think>` (truncated) or with an empty proof scores 0 without a judge call. The judge answers in XML with
`<score>INT</score>`; IMO-ProofBench grading answers `<points>N out of 7</points>`.

Ours, where the reference leaves it open:
- **Which tag counts.** A tag is a complete `<score>...</score>` pair (case-insensitive, no `<` inside). The *last*
  complete pair is the judge's final verdict (`which="last"`, ours; the reference reads the *first* tag, which
  `which="first"` reproduces), and it must hold a plain integer 0..7 (whitespace around it allowed).
  If that last verdict is out of range (8, -1), not an integer (3.5, "seven") or empty, the reply is unparsable
  (`None`): we do not fall back to an earlier tag, because a judge that revised its score to something invalid has
  not given a usable score, and a silent fallback would grade with a number the judge withdrew. Incomplete tags
  (`<score>5` with no closing tag, `<score>5</scor>`) are not tags and are ignored, so an earlier complete tag still
  counts then. `None` is reported as a parse failure, never confused with a real 0.
- **Self-evaluation.** Proofs graded on IMO-ProofBench sometimes end with a section that grades itself ("Self
  Evaluation: 7/7"); `strip_self_evaluation` cuts such a trailing section conservatively (only a heading or bold line
  whose title is one of a few fixed phrases, and never the whole proof).
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = ["band_score", "extract_proof", "parse_points", "parse_score", "strip_self_evaluation"]

MAX_SCORE = 7
THINK_CLOSE = "</think>"

_SCORE_TAG = re.compile(r"<score>([^<]*)</score>", re.IGNORECASE)
_POINTS_TAG = re.compile(r"<points>([^<]*)</points>", re.IGNORECASE)
_INTEGER = re.compile(r"\s*(\d+)\s*")
_POINTS_BODY = re.compile(r"\s*(\d+)\s+out\s+of\s+7\s*", re.IGNORECASE)

# Titles of trailing self-grading sections. Prefix phrases may be followed by more words ("Self-Evaluation of the
# proof"); "Evaluation" alone must be the whole title, since a word like "Evaluating the sum" can start a proof step.
_SELF_EVAL_TITLE = (
    r"(?:self[\s-]*(?:evaluation|assessment|grading|verification)\b[^\n]*"
    r"|verification\s+of\s+the\s+proof\b[^\n]*"
    r"|evaluation)"
)
_SELF_EVAL_LINE = re.compile(
    rf"^[ \t]*(?:#{{1,6}}[ \t]*(?:\*\*)?[ \t]*{_SELF_EVAL_TITLE}[ \t]*:?[ \t]*(?:\*\*)?[ \t]*$"  # markdown heading
    rf"|\*\*[ \t]*{_SELF_EVAL_TITLE}[ \t]*:?[ \t]*\*\*.*$)",  # bold label line
    re.IGNORECASE | re.MULTILINE,
)


Verdict = Literal["last", "first"]


def _verdict(pattern: re.Pattern[str], body: re.Pattern[str], text: str, which: Verdict) -> int | None:
    """The integer in the last (or first) complete tag of `pattern` if its body matches `body` and is in 0..7."""
    tags = pattern.findall(text)
    if not tags:
        return None
    match = body.fullmatch(tags[-1] if which == "last" else tags[0])
    if match is None:
        return None
    value = int(match.group(1))
    return value if 0 <= value <= MAX_SCORE else None


def parse_score(text: str, which: Verdict = "last") -> int | None:
    """The 0..7 score of the judge's last (or first) `<score>N</score>` tag, or None when there is no usable verdict.

    >>> parse_score("<score>3</score><assessment>ok</assessment>")
    3
    >>> parse_score("first <score>2</score> then, on reflection, <score> 5 </score>")
    5
    >>> parse_score("<score>8</score>") is None, parse_score("<score>3.5</score>") is None
    (True, True)
    >>> parse_score("<score>4</score> and later <score>9</score>") is None  # the final verdict is invalid
    True
    >>> parse_score("<score>4</score> then an unfinished <score>6")  # an incomplete tag is not a tag
    4
    >>> parse_score("no verdict") is None, parse_score("<score>2</score> <score>5</score>", which="first")
    (True, 2)
    """
    return _verdict(_SCORE_TAG, _INTEGER, text, which)


def parse_points(text: str, which: Verdict = "last") -> int | None:
    """The N of the last (or first) `<points>N out of 7</points>` (IMO-ProofBench protocol), N in 0..7, else None.

    >>> parse_points("The proof is complete. <points>7 out of 7</points>")
    7
    >>> parse_points("<points>6 out of 7</points> ... <points>1 out of 7</points>")
    1
    >>> parse_points("<points>6/7</points>") is None, parse_points("<points>8 out of 7</points>") is None
    (True, True)
    """
    return _verdict(_POINTS_TAG, _POINTS_BODY, text, which)


def extract_proof(text: str) -> str | None:
    """The text after the last `</think>`, stripped; None when the rollout never closed its thinking.

    >>> extract_proof("<think>a</think> draft </think>\\n Final proof. \\n")
    'Final proof.'
    >>> extract_proof("<think>still thinking") is None
    True
    >>> extract_proof("<think>x</think>   ")
    ''
    """
    head, sep, tail = text.rpartition(THINK_CLOSE)
    if not sep:
        return None
    return tail.strip()


def strip_self_evaluation(proof: str) -> str:
    """Cut a trailing self-grading section (heading or bold line such as "## Self Evaluation") and what follows.

    Conservative: the section must start on its own heading line or with a bold label, its title must be one of a
    few fixed phrases, and the proof is returned unchanged when nothing would remain before the section.

    >>> strip_self_evaluation("Proof. Done.\\n\\n## Self-Evaluation\\nI give myself 7/7.")
    'Proof. Done.'
    >>> strip_self_evaluation("Proof.\\n**Verification of the proof:** every step holds.")
    'Proof.'
    >>> strip_self_evaluation("Evaluation of the sum gives 3, hence the claim.")
    'Evaluation of the sum gives 3, hence the claim.'
    """
    for match in _SELF_EVAL_LINE.finditer(proof):
        kept = proof[: match.start()].rstrip()
        if kept:
            return kept
    return proof


def band_score(score: int) -> int:
    """Map a 0..7 score onto the IMO scale: 1..5 become 1; 0, 6 and 7 are kept.

    >>> [band_score(s) for s in range(8)]
    [0, 1, 1, 1, 1, 1, 6, 7]
    """
    if not 0 <= score <= MAX_SCORE:
        raise ValueError(f"band_score expects a score in 0..{MAX_SCORE}, got {score!r}.")
    return 1 if 1 <= score <= 5 else score
