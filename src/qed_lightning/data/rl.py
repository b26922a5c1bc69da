"""FineProofs-RL as a LightningDataModule: problems with their marking schemes, batched as prompts per RL step.

One batch is one RL step's worth of problems (`prompts_per_step`, 64 in the paper, plus `spare_prompts_per_step`
candidates for dynamic sampling); the module samples `group_size` completions of each. Every row is checked before
any model loads (`validation.py`): a non-empty problem, a usable rubric (markdown or list form; a total read as
anything but 7 is refused, a total that cannot be read is kept and counted as `data/rubric_unverified`), a policy
prompt that fits `max_prompt_tokens`, and the difficulty columns (`scores`: integers 0..7, `reward_mean`: in [0, 1])
when `reward_mean_range` uses them. Per-sample `scores` are range-checked wherever a row has them, like the rubric's
points (a score of 9 is a broken row, and mean(scores) / 7 feeds the difficulty filter of whoever uses the file
next); an unused `reward_mean` is not read. Rejected rows stop the run or are skipped (`on_invalid_row`);
`<run>/data_report.json` lists the counts, the unverified rubrics and the duplicated problems.

Duplicated problems (the same statement once whitespace is normalised) are kept for training (FineProofs-RL has a
few; dropping them is the data owner's call) but reported: a warning with their count and lines, and
`data/duplicate_problems`. None of them is ever drawn into the validation split: a problem that is also trained on
would measure memory, not proving.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from qed_lightning.data.batches import ProblemBatches
from qed_lightning.data.chat import POLICY_PROMPT
from qed_lightning.data.difficulty import difficulty_checks, in_range, pass_rate, scores_value
from qed_lightning.data.loading import ConfigError, DataError, Reject, Table, load_table
from qed_lightning.data.records import ProofProblem, render_policy_prompt
from qed_lightning.data.rubric import check_rubric, read_rubric, render_rubric
from qed_lightning.data.validation import RowPolicy, find_rejects, nonempty_str, remap

__all__ = ["POLICY_PROMPT", "ProblemBatches", "ProofProblem", "ProofRLDataModule", "check_rubric",
           "render_policy_prompt"]

REPORT_FILE = "data_report.json"
log = logging.getLogger(__name__)


def _statement(problem: ProofProblem) -> str:
    return " ".join(problem.problem.split())


def duplicate_lines(problems: list[ProofProblem]) -> list[list[int]]:
    """The lines of each statement that occurs more than once (whitespace normalised), in file order.

    >>> P = lambda line, text: ProofProblem(line - 1, text, "", line=line)
    >>> duplicate_lines([P(1, "Show x."), P(2, "Other."), P(3, "Show  x.\\n"), P(4, "Show x.")])
    [[1, 3, 4]]
    """
    lines: dict[str, list[int]] = {}
    for p in problems:
        lines.setdefault(_statement(p), []).append(p.line)
    return sorted(sorted(group) for group in lines.values() if len(group) > 1)


def split_validation(problems: list[ProofProblem], n_val: int) -> tuple[list[ProofProblem], list[ProofProblem]]:
    """(validation, training): the first `n_val` problems whose statement occurs once; all the others train.

    >>> P = lambda line, text: ProofProblem(line - 1, text, "", line=line)
    >>> val, train = split_validation([P(1, "a"), P(2, "b"), P(3, "a"), P(4, "c")], 1)
    >>> [p.line for p in val], [p.line for p in train]
    ([2], [1, 3, 4])
    """
    counts = Counter(_statement(p) for p in problems)
    val = [p for p in problems if counts[_statement(p)] == 1][:n_val]
    chosen = {id(p) for p in val}
    return val, [p for p in problems if id(p) not in chosen]


class ProofRLDataModule(L.LightningDataModule):
    """Problems + rubrics for rubric RL (FineProofs-RL, or any file with a problem and a rubric column).

    Args:
        path: hub id (e.g. "lm-provers/FineProofs-RL") or a local .jsonl/.json/.parquet file.
        tokenizer: linked to the model's `model_name_or_path` by `qed-fit`.
        subset: hub config name.
        split: hub split.
        columns: map of our fields ("problem", "rubrics", "source", "reward_mean", "scores") onto the file's columns.
        prompts_per_step: problems per RL step for the whole job (each gets `group_size` rollouts), split evenly over
            the data-parallel processes: the step's batch is `prompts_per_step x group_size` sequences on any node
            count (logged as `rollout/sequences`). Refused at start when the process count does not divide it.
        spare_prompts_per_step: extra candidates per step for dynamic sampling (`model.skip_flat_groups`), for the
            whole job like `prompts_per_step`: generated only when groups come out flat, and the bound on its extra
            generations (0 = none).
        val_size: problems held out for the periodic validation pass (graded, not trained on).
        max_prompt_tokens: reject problems whose policy prompt is longer (keep it below the engine's max length
            minus the completion budget).
        prompt_template: the policy prompt; `{problem}` is replaced by the statement.
        on_invalid_row: "error" (refuse the data, naming every bad row) or "skip" (train on the valid rows; the
            rejects go to `<run>/data_rejects.jsonl`).
        max_invalid_fraction: with "skip", the largest share of rejected rows a run starts with.
        reward_mean_range: keep problems whose base-model pass rate (`reward_mean`, else mean(scores) / 7) lies in
            [lo, hi]; None = all problems (paper).
        seed: shuffling seed.
    """

    def __init__(
        self,
        path: str = "lm-provers/FineProofs-RL",
        tokenizer: str | None = None,
        subset: str | None = None,
        split: str = "train",
        columns: dict[str, str] | None = None,
        prompts_per_step: int = 64,
        spare_prompts_per_step: int = 0,
        val_size: int = 0,
        max_prompt_tokens: int = 4096,
        prompt_template: str = POLICY_PROMPT,
        on_invalid_row: Literal["error", "skip"] = "error",
        max_invalid_fraction: float = 0.1,
        reward_mean_range: tuple[float, float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        problems = []
        if prompts_per_step < 1:
            problems.append(f"data.prompts_per_step must be >= 1, got {prompts_per_step}")
        if spare_prompts_per_step < 0 or val_size < 0:
            problems.append(f"data.spare_prompts_per_step and data.val_size must be >= 0, got {spare_prompts_per_step} "
                            f"and {val_size}")
        if "{problem}" not in prompt_template:
            problems.append("data.prompt_template must contain the placeholder {problem}")
        if reward_mean_range is not None and not 0.0 <= reward_mean_range[0] <= reward_mean_range[1] <= 1.0:
            problems.append("data.reward_mean_range must be [lo, hi] with 0 <= lo <= hi <= 1, "
                            f"got {list(reward_mean_range)}")
        if not 0.0 <= max_invalid_fraction <= 1.0:
            problems.append(f"data.max_invalid_fraction must be in [0, 1], got {max_invalid_fraction}")
        if problems:
            raise ValueError("; ".join(problems))
        # the whole config is logged (LogConfigCallback): no hparam merge, so data.seed may differ from model.seed
        self.save_hyperparameters(logger=False)
        self.policy = RowPolicy(on_invalid_row, max_invalid_fraction)
        self.train_problems: list[ProofProblem] = []
        self.val_problems: list[ProofProblem] = []
        self.stats: dict[str, float] = {}
        self.report: dict = {}

    # -- loading -------------------------------------------------------------------------------------------------

    def _checks(self, table: Table) -> dict:
        checks = {"problem": nonempty_str, "rubrics": check_rubric}
        if self.hparams.reward_mean_range is not None:
            checks.update(difficulty_checks({k for row in table.rows for k in row}, self.hparams.columns))
        return checks

    def _problem(self, table: Table, index: int, tokenizer) -> ProofProblem | Reject:
        """Row `index` as a problem, or a reject when its policy prompt is over `max_prompt_tokens`."""
        hp = self.hparams
        fields = remap(table.rows[index], hp.columns, ["problem", "rubrics", "source", "reward_mean", "scores"])
        ids = render_policy_prompt(tokenizer, fields["problem"], hp.prompt_template)
        if len(ids) > hp.max_prompt_tokens:
            column = (hp.columns or {}).get("problem", "problem")
            return table.reject(index, column, f"the policy prompt has {len(ids)} tokens, more than "
                                f"data.max_prompt_tokens={hp.max_prompt_tokens}; "
                                "raise it (and the engine's max_model_len)")
        rate = pass_rate(fields["reward_mean"], fields["scores"]) if hp.reward_mean_range is not None else None
        return ProofProblem(index, fields["problem"], render_rubric(fields["rubrics"]), fields["source"] or "", ids,
                            line=table.positions[index], pass_rate=rate)

    def load_problems(self, tokenizer) -> list[ProofProblem]:
        """Every valid problem of the file (before the difficulty range); rejects follow `on_invalid_row`."""
        hp = self.hparams
        table = load_table(hp.path, subset=hp.subset, split=hp.split)
        rejects = find_rejects(table, self._checks(table), hp.columns)
        if hp.reward_mean_range is None:  # unused by this run, but per-sample scores must be 0..7 (module docstring)
            rejects += find_rejects(table, {"scores": scores_value}, hp.columns, required=False, unreadable=False)
        bad = {r.position for r in rejects}
        problems: list[ProofProblem] = []
        for index, line in enumerate(table.positions):
            if line in bad:
                continue
            made = self._problem(table, index, tokenizer)
            (rejects if isinstance(made, Reject) else problems).append(made)
        rejects.sort(key=lambda r: r.position)
        skipped = self.policy.apply(table.where, rejects, table.total, self._run_dir())
        unverified = self._unverified(table, problems)
        self.stats = {"data/rows_read": float(table.total), "data/rejected": float(len(skipped)),
                      "data/rubric_unverified": float(len(unverified))}
        self.report = {"file": table.where, "rows": table.total, "rejected": len(skipped),
                       "rubric_unverified": unverified}
        return problems

    def _unverified(self, table: Table, problems: list[ProofProblem]) -> list[dict]:
        """The kept problems whose markdown rubric total could not be read: their line and why."""
        column = (self.hparams.columns or {}).get("rubrics", "rubrics")
        readings = ((p, table.rows[p.index][column]) for p in problems)
        readings = ((p, read_rubric(r)) for p, r in readings if isinstance(r, str))
        return [{"line": p.line, "why": reading.why_unread} for p, reading in readings if not reading.verified]

    def _by_difficulty(self, problems: list[ProofProblem]) -> list[ProofProblem]:
        bounds = self.hparams.reward_mean_range
        if bounds is None:
            return problems
        kept = [p for p in problems if in_range(p.pass_rate, tuple(bounds))]
        dropped = len(problems) - len(kept)
        self.stats.update({"data/difficulty_kept": float(len(kept)), "data/difficulty_dropped": float(dropped)})
        self.report["difficulty"] = {"reward_mean_range": list(bounds), "kept": len(kept), "dropped": dropped}
        if not kept:
            raise DataError(f"{self.hparams.path}: no problem has a pass rate in data.reward_mean_range={list(bounds)} "
                            f"(out of {len(problems)}); widen the range.")
        return kept

    # -- Lightning hooks -----------------------------------------------------------------------------------------

    def _run_dir(self) -> Path | None:
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero:
            return None
        return Path(trainer.default_root_dir)

    def per_process(self) -> tuple[int, int]:
        """(prompts, spares) per data-parallel process; refused in one line when the process count does not divide
        the job-wide numbers."""
        world = self.trainer.world_size if self.trainer is not None else 1
        hp = self.hparams
        for key, value in (("prompts_per_step", hp.prompts_per_step),
                           ("spare_prompts_per_step", hp.spare_prompts_per_step)):
            if value % world:
                raise ConfigError(f"data.{key}={value} is for the whole job and must split evenly over its {world} "
                                  f"training processes: use a multiple of {world} "
                                  f"(e.g. {max(value // world, 1) * world})")
        return hp.prompts_per_step // world, hp.spare_prompts_per_step // world

    def setup(self, stage: str | None = None) -> None:
        self.per_process()  # at the door, before the tokenizer, the data and the engine load
        if self.train_problems:
            return
        from transformers import AutoTokenizer

        if self.hparams.tokenizer is None:
            raise ValueError("ProofRLDataModule needs `data.tokenizer` (qed-fit links it to model.model_name_or_path).")
        problems = self._by_difficulty(self.load_problems(AutoTokenizer.from_pretrained(self.hparams.tokenizer)))
        random.Random(self.hparams.seed).shuffle(problems)
        n_val = self.hparams.val_size
        if n_val >= len(problems):
            raise DataError(f"{self.hparams.path}: data.val_size={n_val} leaves no training problems "
                            f"out of {len(problems)}.")
        duplicates = self._report_duplicates(problems)
        self.val_problems, self.train_problems = split_validation(problems, n_val)
        if len(self.val_problems) < n_val:
            raise DataError(f"{self.hparams.path}: data.val_size={n_val}, but only {len(self.val_problems)} problems "
                            f"occur once (duplicated statements at lines {duplicates} never go to validation); lower "
                            "data.val_size or remove the duplicates.")
        self.stats["data/problems"] = float(len(self.train_problems))
        self._publish()

    def _report_duplicates(self, problems: list[ProofProblem]) -> list[list[int]]:
        """Log and record the duplicated statements (their lines); they train, never validate."""
        groups = duplicate_lines(problems)
        self.stats["data/duplicate_problems"] = float(sum(len(g) - 1 for g in groups))
        self.report["duplicates"] = groups
        if groups:
            log.warning("%s: %d problem(s) occur more than once (same statement, whitespace aside), at lines %s; they "
                        "are kept for training and never put in the validation split", self.hparams.path,
                        len(groups), "; ".join(", ".join(map(str, g)) for g in groups[:20]))
        return groups

    def _publish(self) -> None:
        """Log the data counts (rank zero), and write `<run>/data_report.json`."""
        s = self.stats
        difficulty = (f", {int(s['data/difficulty_dropped'])} outside data.reward_mean_range"
                      if "data/difficulty_dropped" in s else "")
        rank_zero_info(f"RL data: {len(self.train_problems)} train and {len(self.val_problems)} validation "
                       f"problems from {self.hparams.path} ({int(s['data/rows_read'])} rows, "
                       f"{int(s['data/rejected'])} rejected{difficulty}, "
                       f"{int(s['data/rubric_unverified'])} rubrics whose total could not be read, kept)")
        run_dir = self._run_dir()
        if run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / REPORT_FILE).write_text(json.dumps({**self.report, "stats": s}, indent=2) + "\n", encoding="utf-8")
        if self.trainer.logger is not None:
            self.trainer.logger.log_metrics(s, step=0)

    def _batches(self, problems: list[ProofProblem], shuffle: bool, spares: bool) -> ProblemBatches:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        prompts, spare = self.per_process()
        return ProblemBatches(problems, prompts, self.hparams.seed, shuffle, rank, world, spare if spares else 0)

    def train_dataloader(self) -> ProblemBatches:
        return self._batches(self.train_problems, shuffle=True, spares=True)

    def val_dataloader(self) -> ProblemBatches | list:
        return self._batches(self.val_problems, shuffle=False, spares=False) if self.val_problems else []
