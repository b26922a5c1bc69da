"""Judge prompt templates as versioned text files, and a brace-safe renderer (SPEC 4, 6).

Paper's choice: the reference's "v1" rubric prompt (problem statement, marking scheme, proof; XML answer with a
0..7 score) and the IMO-ProofBench grading protocol (reference solution, guidelines, `<points>N out of 7</points>`).
Ours: both written in our own words under `prompts/`, loaded by name (`"rubric_v1"`) or from a user's file path.
A run records `JudgePrompt.version` = name + the first 8 hex digits of the text's sha256, so editing a template in
place can never be mistaken for the same prompt (and never hits the grade cache of the old text).

Rendering substitutes the exact placeholders `{problem}`, `{rubric}`, `{proof}`, `{reference_solution}` and
`{guidelines}` in one pass. It does not use `str.format`, because the substituted LaTeX is full of braces
(`\\frac{a}{b}`), and one pass means text inside a substituted value (a proof that happens to contain `{rubric}`)
is never substituted again. A template file is used verbatim: its text is sent as it is, with only the placeholders
replaced. `aliases` lets a file written with other placeholder names (the reference's `{marking_scheme}`,
`{student_answer}`, ...) be used unchanged: `{"marking_scheme": "rubric"}` fills `{marking_scheme}` with the rubric.
The aliases are part of the version, since they change what the judge reads. The judge fills `{proof}` with the
proof fenced by a per-call random id (`parsing.fence_proof`); `JudgePrompt.delimiters` are the template's own
`=== ... ===` lines, which a proof that repeats them is flagged for.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["PLACEHOLDERS", "JudgePrompt", "load_prompt", "packaged_prompts"]

PLACEHOLDERS = ("problem", "rubric", "proof", "reference_solution", "guidelines")
_PACKAGE_DIR = "prompts"


@dataclass(frozen=True)
class JudgePrompt:
    """A judge prompt template. `version` (name@short-sha) is what a run records and what keys the grade cache;
    `aliases` maps placeholder names used in the text onto our fields."""

    name: str
    version: str
    text: str
    sha: str
    aliases: tuple[tuple[str, str], ...] = ()

    @property
    def _pattern(self) -> re.Pattern[str]:
        names = [*PLACEHOLDERS, *(alias for alias, _ in self.aliases)]
        return re.compile(r"\{(" + "|".join(map(re.escape, names)) + r")\}")

    @property
    def delimiters(self) -> tuple[str, ...]:
        """The template's section markers: its lines of the form `=== ... ===` (a proof that writes one is flagged).

        >>> make_prompt("t", "=== Proof ===\\n{proof}\\n=== End of Proof ===\\nGrade it.").delimiters
        ('=== Proof ===', '=== End of Proof ===')
        """
        lines = (line.strip() for line in self.text.splitlines())
        return tuple(line for line in lines if len(line) > 6 and line.startswith("===") and line.endswith("==="))

    @property
    def placeholders(self) -> set[str]:
        """Our fields that the template's placeholders (or their aliases) ask for."""
        aliases = dict(self.aliases)
        return {aliases.get(name, name) for name in self._pattern.findall(self.text)}

    def require(self, fields: set[str]) -> None:
        """Raise if the template lacks a placeholder that the judge must fill (e.g. `{proof}`)."""
        missing = sorted(fields - self.placeholders)
        if missing:
            names = ", ".join("{" + m + "}" for m in missing)
            raise ValueError(f"judge prompt {self.name!r} lacks the placeholder(s) {names}; add them to the template.")

    def render(self, **values: str) -> str:
        """Substitute the placeholders in one pass; every placeholder present in the template needs a value.

        >>> p = make_prompt("t", "Problem: {problem}\\nProof: {proof}")
        >>> p.render(problem=r"Show $\\frac{a}{b} \\ge 0$ for {a, b}.", proof="{rubric} stays as is")
        'Problem: Show $\\\\frac{a}{b} \\\\ge 0$ for {a, b}.\\nProof: {rubric} stays as is'
        """
        missing = sorted(self.placeholders - {k for k, v in values.items() if v is not None})
        if missing:
            raise ValueError(f"judge prompt {self.name!r} needs values for {missing}; got {sorted(values)}.")
        aliases = dict(self.aliases)
        return self._pattern.sub(lambda m: values[aliases.get(m.group(1), m.group(1))], self.text)


def make_prompt(name: str, text: str, aliases: dict[str, str] | None = None) -> JudgePrompt:
    """A JudgePrompt from a name, a text and placeholder aliases (their name -> our field); the version is `name@` +
    the first 8 hex digits of the sha256 of the text (and of the aliases, when there are some).

    >>> p = make_prompt("ref", "Q: {problem_statement} A: {student_answer}",
    ...                 {"problem_statement": "problem", "student_answer": "proof"})
    >>> p.placeholders == {"problem", "proof"}, p.render(problem="1+1?", proof="2")
    (True, 'Q: 1+1? A: 2')
    """
    pairs = tuple(sorted((aliases or {}).items()))
    unknown = sorted({field for _, field in pairs} - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(f"judge prompt {name!r}: placeholder aliases map onto unknown fields {unknown}; "
                         f"the fields are {list(PLACEHOLDERS)}.")
    keyed = text if not pairs else text + "\n" + repr(pairs)
    sha = hashlib.sha256(keyed.encode("utf-8")).hexdigest()
    return JudgePrompt(name=name, version=f"{name}@{sha[:8]}", text=text, sha=sha, aliases=pairs)


def packaged_prompts() -> list[str]:
    """Names of the templates shipped with the package."""
    folder = resources.files(__package__) / _PACKAGE_DIR
    return sorted(p.name[: -len(".txt")] for p in folder.iterdir() if p.name.endswith(".txt"))


def load_prompt(name_or_path: str, aliases: dict[str, str] | None = None) -> JudgePrompt:
    """Load a packaged template by name ("rubric_v1") or a user's template file by path (its text used verbatim)."""
    packaged = resources.files(__package__) / _PACKAGE_DIR / f"{name_or_path}.txt"
    if "/" not in name_or_path and packaged.is_file():
        return make_prompt(name_or_path, packaged.read_text(encoding="utf-8"), aliases)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return make_prompt(path.stem, path.read_text(encoding="utf-8"), aliases)
    raise ValueError(
        f"judge prompt {name_or_path!r} is neither a packaged template ({', '.join(packaged_prompts())}) "
        "nor an existing file; set the judge's `prompt` to one of those names or to a template path."
    )
