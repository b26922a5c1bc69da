"""Deterministic scoring rules of the scripted judge (tests and CPU demos only), and where it finds the proof.

The scripted judge reads the proof between the `=== Proof Solution ===` and `=== End of Proof Solution ===`
markers that both packaged judge templates use (a test checks that they do), and scores it with one rule:

- "length": `min(7, len(proof) // chars_per_point)`;
- "keyword": `min(7, proof.count(keyword))`;
- "char_fraction": `floor(7 * f + 0.5)` (half rounds up), f = the fraction of the proof's non-whitespace
  characters that are in `charset` (0 for a proof with no such characters);
- "fixed": always `score`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["PROOF_END", "PROOF_START", "RULES", "Rule", "ScoringRule", "proof_section"]

PROOF_START = "=== Proof Solution ==="
PROOF_END = "=== End of Proof Solution ==="
RULES = ("length", "keyword", "char_fraction", "fixed")
Rule = Literal["length", "keyword", "char_fraction", "fixed"]


@dataclass(frozen=True)
class ScoringRule:
    """A deterministic proof -> 0..7 rule (see the module docstring)."""

    name: Rule = "keyword"
    keyword: str = "proof"
    chars_per_point: int = 200
    charset: str = "0123456789"
    score: int = 7

    def __post_init__(self) -> None:
        problems = []
        if self.name not in RULES:
            problems.append(f"rule must be one of {RULES}, got {self.name!r}")
        if self.name == "keyword" and not self.keyword:
            problems.append("rule 'keyword' needs a non-empty keyword")
        if self.chars_per_point < 1:
            problems.append(f"chars_per_point must be >= 1, got {self.chars_per_point}")
        if not 0 <= self.score <= 7:
            problems.append(f"score (rule 'fixed') must be in 0..7, got {self.score}")
        if problems:
            raise ValueError("scripted judge: " + "; ".join(problems) + ".")

    def describe(self) -> str:
        detail = {"length": f"chars_per_point={self.chars_per_point}", "keyword": f"keyword={self.keyword!r}",
                  "char_fraction": f"charset={self.charset!r}", "fixed": f"score={self.score}"}[self.name]
        return f"{self.name} {detail}"

    def __call__(self, proof: str) -> int:
        if self.name == "length":
            return min(7, len(proof) // self.chars_per_point)
        if self.name == "keyword":
            return min(7, proof.count(self.keyword))
        if self.name == "char_fraction":
            chars = [c for c in proof if not c.isspace()]
            fraction = sum(c in self.charset for c in chars) / len(chars) if chars else 0.0
            return math.floor(7 * fraction + 0.5)
        return self.score


def proof_section(prompt: str) -> str | None:
    """The proof inside a rendered judge prompt (between the template's proof markers), or None."""
    end = prompt.rfind(PROOF_END)
    start = prompt.rfind(PROOF_START, 0, end) if end >= 0 else -1
    if start < 0:
        return None
    return prompt[start + len(PROOF_START) : end].strip()
