#!/usr/bin/env python3
"""Validate the bundled sample data files under data/samples/.

Standard library only. Checks, for each of the four sample files, the exact
key set and value types of every row, the row count, and the
dataset-specific invariants:

* fineproofs_sft.jsonl: ``messages`` is rebuilt from problem / reasoning /
  proof; grade in 0..7; reward in [0, 1].
* fineproofs_rl.jsonl: the markdown rubric parses (checkpoint points sum to
  7, with parallel "Chain" paths maxed rather than summed; deduction and
  zero-credit lines well formed); rewards == scores / 7; num_rewards,
  reward_mean and reward_std (population std) are consistent.
* imo_proofbench.jsonl: ids PB-Basic-NNN / PB-Advanced-NNN numbered in order
  and matching ``level``; grading guidelines have the (Partial) / (Almost) /
  (Complete) sections.
* proofbench.jsonl: grading_scheme items are {title, points, desc} with
  points summing to 7.

Prints ``path:line: message | problem: ...`` for every violation and exits
with status 1, otherwise prints per-file ok counts and exits 0.

Usage: python scripts/check_samples.py [SAMPLES_DIR]
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

CATEGORIES = ("Algebra", "Combinatorics", "Geometry", "Number Theory")
USER_PREFIX = "Generate a rigorous proof to the following question:\n\n"

SFT_FILE = "fineproofs_sft.jsonl"
RL_FILE = "fineproofs_rl.jsonl"
PB_FILE = "imo_proofbench.jsonl"
PROOFBENCH_FILE = "proofbench.jsonl"

SFT_KEYS = {
    "problem", "reasoning_content", "proof", "messages", "category",
    "competition", "source", "gemini-3-pro-grade",
    "qwen3-4b-thinking-reward@128",
}
RL_KEYS = {
    "problem", "source", "rubrics", "scores", "rewards", "num_rewards",
    "reward_mean", "reward_std",
}
PB_KEYS = {
    "problem_id", "problem", "solution", "grading_guidelines", "category",
    "level", "source",
}
PROOFBENCH_KEYS = {"problem_id", "problem", "grading_scheme", "category", "source"}

EXPECTED_ROWS = {SFT_FILE: 24, RL_FILE: 24, PB_FILE: 12, PROOFBENCH_FILE: 6}
# Every category must appear at least this often. A file with 12 rows cannot
# hold 4 rows of each of 4 categories, so imo_proofbench needs 3 of each.
MIN_PER_CATEGORY = {SFT_FILE: 4, RL_FILE: None, PB_FILE: 3, PROOFBENCH_FILE: None}
MIN_CHAIN_ROWS = 4  # rows of fineproofs_rl using parallel solution chains

# Soft length bounds (characters) keeping the samples small for CPU training.
SFT_PROOF_LEN = (250, 1200)
SFT_REASONING_LEN = (150, 900)

RUBRIC_HEADERS = (
    "## Checkpoints (7 pts total)",
    "## Zero-credit items",
    "## Deductions",
)
CHECKPOINT_RE = re.compile(r"^- \*\*([1-9]\d*) (pt|pts)\*\*: \S.*$")
CHAIN_RE = re.compile(r"^\*\*Chain ([A-Z]) \(([^()]+)\)\*\*$")
DEDUCTION_RE = re.compile(r"^- \*\*(-1|-2|cap at ([0-6])/7)\*\*: \S.*$")
ZERO_CREDIT_RE = re.compile(r"^- (?!\*\*)\S.*$")
PB_ID_RE = re.compile(r"^PB-(Basic|Advanced)-(\d{3})$")


class Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: Path, line: int, row: dict | None, msg: str) -> None:
        problem = ""
        if isinstance(row, dict) and isinstance(row.get("problem"), str):
            snippet = " ".join(row["problem"].split())
            problem = f" | problem: {snippet[:90]}"
        self.errors.append(f"{path}:{line}: {msg}{problem}")

    # ------------------------------------------------------------------ io
    def load(self, path: Path) -> list[tuple[int, dict]]:
        rows: list[tuple[int, dict]] = []
        if not path.is_file():
            self.error(path, 0, None, "file is missing")
            return rows
        with path.open(encoding="utf-8") as f:
            for lineno, text in enumerate(f, start=1):
                if not text.strip():
                    self.error(path, lineno, None, "blank line")
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    self.error(path, lineno, None, f"invalid JSON: {exc}")
                    continue
                if not isinstance(row, dict):
                    self.error(path, lineno, None, "row is not a JSON object")
                    continue
                rows.append((lineno, row))
        expected = EXPECTED_ROWS[path.name]
        if len(rows) != expected:
            self.error(path, 0, None, f"expected {expected} rows, found {len(rows)}")
        return rows

    # ------------------------------------------------------------- helpers
    def keys(self, path: Path, line: int, row: dict, expected: set[str]) -> bool:
        got = set(row)
        if got != expected:
            missing = sorted(expected - got)
            extra = sorted(got - expected)
            self.error(path, line, row, f"key mismatch: missing={missing} extra={extra}")
            return False
        return True

    def nonempty_str(self, path: Path, line: int, row: dict, key: str) -> bool:
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            self.error(path, line, row, f"{key!r} must be a non-empty string")
            return False
        if value != value.strip():
            self.error(path, line, row, f"{key!r} has leading/trailing whitespace")
        return True

    def category(self, path: Path, line: int, row: dict) -> None:
        if row.get("category") not in CATEGORIES:
            self.error(path, line, row, f"category {row.get('category')!r} not in {CATEGORIES}")

    def category_balance(self, path: Path, rows: list[tuple[int, dict]]) -> None:
        minimum = MIN_PER_CATEGORY[path.name]
        if minimum is None:
            return
        counts = Counter(row.get("category") for _, row in rows)
        for cat in CATEGORIES:
            if counts[cat] < minimum:
                self.error(path, 0, None, f"category {cat!r} appears {counts[cat]} times, need >= {minimum}")

    def length(self, path: Path, line: int, row: dict, key: str, bounds: tuple[int, int]) -> None:
        n = len(row[key])
        if not bounds[0] <= n <= bounds[1]:
            self.error(path, line, row, f"{key!r} has {n} chars, expected {bounds[0]}..{bounds[1]}")

    # ----------------------------------------------------------------- sft
    def check_sft(self, path: Path) -> int:
        rows = self.load(path)
        for line, row in rows:
            if not self.keys(path, line, row, SFT_KEYS):
                continue
            ok = all(self.nonempty_str(path, line, row, k) for k in
                     ("problem", "reasoning_content", "proof", "competition", "source"))
            self.category(path, line, row)
            grade = row["gemini-3-pro-grade"]
            if type(grade) is not int or not 0 <= grade <= 7:
                self.error(path, line, row, f"gemini-3-pro-grade must be an int in 0..7, got {grade!r}")
            reward = row["qwen3-4b-thinking-reward@128"]
            if type(reward) is not float or not 0.0 <= reward <= 1.0:
                self.error(path, line, row, f"qwen3-4b-thinking-reward@128 must be a float in [0, 1], got {reward!r}")
            if not ok:
                continue
            self.length(path, line, row, "proof", SFT_PROOF_LEN)
            self.length(path, line, row, "reasoning_content", SFT_REASONING_LEN)
            expected_messages = [
                {"role": "user", "content": USER_PREFIX + row["problem"]},
                {"role": "assistant",
                 "content": "<think>\n" + row["reasoning_content"] + "\n</think>\n\n" + row["proof"]},
            ]
            if row["messages"] != expected_messages:
                self.error(path, line, row, "messages are not consistent with problem/reasoning_content/proof")
        self.category_balance(path, rows)
        self.unique(path, rows, "problem")
        return len(rows)

    # ------------------------------------------------------------------ rl
    def parse_rubric(self, text: str) -> tuple[list[str], bool]:
        """Return (problems found, uses_chains) for a rubric string."""
        problems: list[str] = []
        lines = text.split("\n")
        header_idx = []
        for header in RUBRIC_HEADERS:
            idx = [i for i, ln in enumerate(lines) if ln == header]
            if len(idx) != 1:
                problems.append(f"rubric must contain the line {header!r} exactly once")
                return problems, False
            header_idx.append(idx[0])
        if header_idx[0] != 0:
            problems.append("rubric must start with '## Checkpoints (7 pts total)'")
        if header_idx != sorted(header_idx):
            problems.append("rubric sections out of order")
            return problems, False
        stray = [ln for ln in lines if ln.startswith("#") and ln not in RUBRIC_HEADERS]
        if stray:
            problems.append(f"unexpected heading lines: {stray}")

        def body(k: int) -> list[str]:
            end = header_idx[k + 1] if k + 1 < len(header_idx) else len(lines)
            return [ln for ln in lines[header_idx[k] + 1:end] if ln.strip()]

        # Checkpoints, with optional parallel chains.
        common: list[int] = []
        chains: list[tuple[str, list[int]]] = []
        for ln in body(0):
            m = CHECKPOINT_RE.match(ln)
            c = CHAIN_RE.match(ln)
            if m:
                pts, unit = int(m.group(1)), m.group(2)
                if (pts == 1) != (unit == "pt"):
                    problems.append(f"use 'pt' for 1 point and 'pts' otherwise: {ln!r}")
                (chains[-1][1] if chains else common).append(pts)
            elif c:
                chains.append((c.group(1), []))
            else:
                problems.append(f"bad checkpoint line: {ln!r}")
        uses_chains = bool(chains)
        if chains:
            letters = [name for name, _ in chains]
            expected_letters = [chr(ord("A") + i) for i in range(len(chains))]
            if letters != expected_letters:
                problems.append(f"chains must be labelled {expected_letters}, got {letters}")
            if len(chains) < 2:
                problems.append("a rubric with chains needs at least two chains")
            for name, pts in chains:
                if not pts:
                    problems.append(f"Chain {name} has no checkpoints")
                if not 2 <= len(common) + len(pts) <= 4:
                    problems.append(f"Chain {name}: {len(common) + len(pts)} checkpoints on this path, expected 2..4")
            total = sum(common) + max((sum(p) for _, p in chains), default=0)
        else:
            total = sum(common)
            if not 2 <= len(common) <= 4:
                problems.append(f"{len(common)} checkpoints, expected 2..4")
        if total != 7:
            problems.append(f"checkpoint total is {total}, expected 7 (common + max over chains)")

        zero = body(1)
        if not 2 <= len(zero) <= 3:
            problems.append(f"{len(zero)} zero-credit items, expected 2..3")
        for ln in zero:
            if not ZERO_CREDIT_RE.match(ln):
                problems.append(f"bad zero-credit line: {ln!r}")

        deductions = body(2)
        if not 2 <= len(deductions) <= 3:
            problems.append(f"{len(deductions)} deductions, expected 2..3")
        for ln in deductions:
            if not DEDUCTION_RE.match(ln):
                problems.append(f"bad deduction line: {ln!r}")
        return problems, uses_chains

    def check_rl(self, path: Path, sft_problems: set[str]) -> int:
        rows = self.load(path)
        chain_rows = 0
        for line, row in rows:
            if not self.keys(path, line, row, RL_KEYS):
                continue
            for k in ("problem", "source", "rubrics"):
                self.nonempty_str(path, line, row, k)
            if isinstance(row["problem"], str) and row["problem"] in sft_problems:
                self.error(path, line, row, f"problem duplicates a row of {SFT_FILE}")
            if isinstance(row["rubrics"], str):
                problems, uses_chains = self.parse_rubric(row["rubrics"])
                chain_rows += uses_chains
                for p in problems:
                    self.error(path, line, row, f"rubric: {p}")
            scores, rewards = row["scores"], row["rewards"]
            if (not isinstance(scores, list) or not 4 <= len(scores) <= 8
                    or any(type(s) is not int or not 0 <= s <= 7 for s in scores)):
                self.error(path, line, row, f"scores must be a list of 4..8 ints in 0..7, got {scores!r}")
                continue
            if (not isinstance(rewards, list) or len(rewards) != len(scores)
                    or any(type(r) not in (int, float) for r in rewards)):
                self.error(path, line, row, "rewards must be a list of numbers as long as scores")
                continue
            if any(abs(r - s / 7) > 1e-9 for r, s in zip(rewards, scores)):
                self.error(path, line, row, "rewards != scores / 7")
            if type(row["num_rewards"]) is not int or row["num_rewards"] != len(rewards):
                self.error(path, line, row, f"num_rewards {row['num_rewards']!r} != {len(rewards)}")
            mean = statistics.fmean(rewards)
            std = statistics.pstdev(rewards)
            for key, want in (("reward_mean", mean), ("reward_std", std)):
                got = row[key]
                if type(got) not in (int, float) or not math.isclose(got, want, rel_tol=0, abs_tol=1e-9):
                    self.error(path, line, row, f"{key} {got!r} != {want!r}")
        if chain_rows < MIN_CHAIN_ROWS:
            self.error(path, 0, None, f"only {chain_rows} rubrics use Chain A/B paths, need >= {MIN_CHAIN_ROWS}")
        self.unique(path, rows, "problem")
        return len(rows)

    # ------------------------------------------------------ imo proofbench
    def check_pb(self, path: Path) -> int:
        rows = self.load(path)
        seen: Counter[str] = Counter()
        for line, row in rows:
            if not self.keys(path, line, row, PB_KEYS):
                continue
            for k in ("problem_id", "problem", "solution", "grading_guidelines", "source"):
                self.nonempty_str(path, line, row, k)
            self.category(path, line, row)
            m = PB_ID_RE.match(str(row["problem_id"]))
            if not m:
                self.error(path, line, row, f"bad problem_id {row['problem_id']!r}")
            else:
                level, num = m.group(1), int(m.group(2))
                if row["level"] != level:
                    self.error(path, line, row, f"level {row['level']!r} does not match id {row['problem_id']!r}")
                seen[level] += 1
                if num != seen[level]:
                    self.error(path, line, row,
                               f"{row['problem_id']!r} out of sequence, expected number {seen[level]:03d}")
            if row["level"] not in ("Basic", "Advanced"):
                self.error(path, line, row, f"level must be 'Basic' or 'Advanced', got {row['level']!r}")
            guide = row["grading_guidelines"]
            if isinstance(guide, str):
                marks = [guide.find(s) for s in ("(Partial)\n 1. ", "(Almost)\n 1. ", "(Complete)\n 1. ")]
                if -1 in marks or marks != sorted(marks) or marks[0] != 0:
                    self.error(path, line, row, "grading_guidelines must be '(Partial)\\n 1. ...' then "
                               "'(Almost)' then '(Complete)' sections")
            if isinstance(row["solution"], str) and len(row["solution"]) < 200:
                self.error(path, line, row, "solution looks too short to be a complete proof")
        for level in ("Basic", "Advanced"):
            if seen[level] == 0:
                self.error(path, 0, None, f"no {level} problems")
        self.category_balance(path, rows)
        self.unique(path, rows, "problem_id")
        self.unique(path, rows, "problem")
        return len(rows)

    # ----------------------------------------------------------- proofbench
    def check_proofbench(self, path: Path) -> int:
        rows = self.load(path)
        for line, row in rows:
            if not self.keys(path, line, row, PROOFBENCH_KEYS):
                continue
            for k in ("problem_id", "problem", "source"):
                self.nonempty_str(path, line, row, k)
            self.category(path, line, row)
            scheme = row["grading_scheme"]
            if not isinstance(scheme, list) or not scheme:
                self.error(path, line, row, "grading_scheme must be a non-empty list")
                continue
            total = 0
            for i, item in enumerate(scheme):
                if not isinstance(item, dict) or set(item) != {"title", "points", "desc"}:
                    self.error(path, line, row, f"grading_scheme[{i}] must have exactly title/points/desc")
                    continue
                if not (isinstance(item["title"], str) and item["title"].strip()
                        and isinstance(item["desc"], str) and item["desc"].strip()):
                    self.error(path, line, row, f"grading_scheme[{i}] title/desc must be non-empty strings")
                if type(item["points"]) is not int or item["points"] <= 0:
                    self.error(path, line, row, f"grading_scheme[{i}] points must be a positive int")
                else:
                    total += item["points"]
            if total != 7:
                self.error(path, line, row, f"grading_scheme points sum to {total}, expected 7")
        self.unique(path, rows, "problem_id")
        self.unique(path, rows, "problem")
        return len(rows)

    def unique(self, path: Path, rows: list[tuple[int, dict]], key: str) -> None:
        first: dict[str, int] = {}
        for line, row in rows:
            value = row.get(key)
            if not isinstance(value, str):
                continue
            if value in first:
                self.error(path, line, row, f"duplicate {key} (first at line {first[value]})")
            else:
                first[value] = line


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "data" / "samples"
    checker = Checker()
    n_sft = checker.check_sft(root / SFT_FILE)
    sft_problems = set()
    if (root / SFT_FILE).is_file():
        with (root / SFT_FILE).open(encoding="utf-8") as f:
            for text in f:
                try:
                    sft_problems.add(json.loads(text).get("problem"))
                except (json.JSONDecodeError, AttributeError):
                    pass
    counts = {
        SFT_FILE: n_sft,
        RL_FILE: checker.check_rl(root / RL_FILE, sft_problems),
        PB_FILE: checker.check_pb(root / PB_FILE),
        PROOFBENCH_FILE: checker.check_proofbench(root / PROOFBENCH_FILE),
    }
    if checker.errors:
        for e in checker.errors:
            print(e)
        print(f"FAILED: {len(checker.errors)} problem(s)", file=sys.stderr)
        return 1
    for name, n in counts.items():
        print(f"ok {n:3d} rows  {root / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
