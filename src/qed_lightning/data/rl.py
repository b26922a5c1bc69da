"""FineProofs-RL as a LightningDataModule: problems with their marking schemes, batched as prompts per RL step.

One batch is one RL step's worth of problems (`prompts_per_step`, 64 in the paper); the module samples `group_size`
completions of each. Rows are validated before any model loads: a non-empty problem, a rubric (markdown or list
form) whose checkpoints add up to 7, and a policy prompt that fits the engine's context.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from qed_lightning.data.loading import DataError, load_rows, nonempty_str, remap, validate_rows
from qed_lightning.rewards.rubric import render_rubric, rubric_total

POLICY_PROMPT = "Generate a rigorous proof to the following question:\n\n{problem}"


@dataclass
class ProofProblem:
    """One RL problem: the statement, its rendered marking scheme, and the tokenized policy prompt."""

    index: int
    problem: str
    rubric: str
    source: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def check_rubric(value: Any) -> str | None:
    """A data-layer check: the rubric renders and (markdown form) its checkpoints total 7 points."""
    if isinstance(value, list):
        try:
            render_rubric(value)
        except (ValueError, TypeError) as err:
            return str(err)
        total = sum(int(item.get("points", 0)) for item in value)
        return None if total == 7 else f"rubric items total {total} points, expected 7"
    problem = nonempty_str(value)
    if problem:
        return problem
    try:
        total = rubric_total(value)
    except ValueError as err:
        return str(err)
    return None if total == 7 else f"rubric checkpoints total {total} points, expected 7 (chains count by their maximum)"


def render_policy_prompt(tokenizer, problem: str, template: str = POLICY_PROMPT) -> list[int]:
    """The paper's policy prompt (one user turn, no system prompt), chat-templated and tokenized."""
    messages = [{"role": "user", "content": template.replace("{problem}", problem)}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class ProblemBatches:
    """The RL step's problems, in a seeded order per epoch, that resumes exactly where a checkpoint left off.

    Lightning saves the `state_dict` of any loader that has one with each checkpoint and restores it on resume, so
    a run killed mid-epoch neither repeats nor skips a problem (a plain shuffling DataLoader restarts its epoch).
    The order of epoch e is a permutation seeded by (seed, e), identical on every rank; rank r takes every W-th
    problem of it. Lightning does not prefetch from a loader of known length, so at checkpoint time the batches
    handed out are exactly the batches trained (the kill-and-resume test pins this). Each new pass over the loader
    is the next epoch, except the first pass after a restore, which finishes the restored epoch.
    """

    def __init__(self, problems: list[ProofProblem], batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        self.problems, self.batch_size, self.seed, self.shuffle = problems, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.consumed, self._resume_at, self._started = 0, 0, 0, False

    def _order(self, epoch: int) -> list[ProofProblem]:
        order = list(self.problems)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank (a data-parallel step needs all ranks): full batches only,
        the remainder waits for the next epoch's order; a dataset smaller than one global batch gives one
        partial batch."""
        full = len(self.problems) // (self.batch_size * self.world_size)
        return full if full > 0 else 1

    def __iter__(self):
        if self._started:
            self.epoch += 1
        self._started = True
        start, self._resume_at = self._resume_at, 0
        mine = self._order(self.epoch)
        self.consumed = start
        for pos in range(start, len(self)):
            self.consumed = pos + 1
            yield mine[pos * self.batch_size : (pos + 1) * self.batch_size]

    def peek(self) -> list[ProofProblem] | None:
        """The batch the running pass yields next, without consuming it (None at the end of a pass): what
        `AsyncRollouts` generates while the current step trains."""
        if not self._started or self.consumed >= len(self):
            return None
        return self._order(self.epoch)[self.consumed * self.batch_size : (self.consumed + 1) * self.batch_size]

    def problem_at(self, n: int) -> ProofProblem:
        """The n-th problem of this rank's run-long order (each epoch's full batches, epochs one after another):
        problem n of batch k = n // batch_size is what the k-th training step gets. The streaming layout
        (`rollout.streaming`) reads it ahead with its own cursor, saved in its checkpoint state."""
        per_epoch = min(len(self) * self.batch_size, len(self.problems[self.rank :: self.world_size]))
        epoch, pos = divmod(n, per_epoch)  # (a dataset smaller than one batch: epochs of all its problems)
        return self._order(epoch)[pos]

    def state_dict(self) -> dict[str, int]:
        if self._started and self.consumed >= len(self):
            return {"epoch": self.epoch + 1, "consumed": 0, "seed": self.seed}
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._resume_at, self._started = int(state["epoch"]), int(state["consumed"]), False


class ProofRLDataModule(L.LightningDataModule):
    """Problems + rubrics for rubric RL (FineProofs-RL, or any file with a problem and a rubric column).

    Args:
        path: hub id (e.g. "lm-provers/FineProofs-RL") or a local .jsonl/.json/.parquet file.
        tokenizer: linked to the model's `model_name_or_path` by `qed-fit`.
        subset: hub config name. split: hub split.
        columns: map of our fields ("problem", "rubrics", "source") onto the file's columns.
        prompts_per_step: problems per RL step *per training process* (each gets `group_size` rollouts); the
            step's batch is `prompts_per_step x world size x group_size` sequences.
        val_size: problems held out for the periodic validation pass (graded, not trained on).
        max_prompt_tokens: refuse problems whose policy prompt is longer (keep it below the engine's max length
            minus the completion budget).
        prompt_template: the policy prompt; `{problem}` is replaced by the statement.
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
        val_size: int = 0,
        max_prompt_tokens: int = 4096,
        prompt_template: str = POLICY_PROMPT,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if prompts_per_step < 1:
            raise ValueError(f"data.prompts_per_step must be >= 1, got {prompts_per_step}")
        if val_size < 0:
            raise ValueError(f"data.val_size must be >= 0, got {val_size}")
        if "{problem}" not in prompt_template:
            raise ValueError("data.prompt_template must contain the placeholder {problem}")
        self.save_hyperparameters()
        self.train_problems: list[ProofProblem] = []
        self.val_problems: list[ProofProblem] = []

    def load_problems(self, tokenizer) -> list[ProofProblem]:
        hp = self.hparams
        rows = load_rows(hp.path, subset=hp.subset, split=hp.split)
        validate_rows(rows, {"problem": nonempty_str, "rubrics": check_rubric}, where=hp.path, columns=hp.columns)
        problems = []
        for i, row in enumerate(rows):
            fields = remap(row, hp.columns, ["problem", "rubrics", "source"])
            ids = render_policy_prompt(tokenizer, fields["problem"], hp.prompt_template)
            if len(ids) > hp.max_prompt_tokens:
                raise DataError(f"{hp.path}: row {i}, column 'problem': the policy prompt has {len(ids)} tokens, more "
                                f"than data.max_prompt_tokens={hp.max_prompt_tokens}; raise it (and the engine's max_model_len).")
            problems.append(ProofProblem(i, fields["problem"], render_rubric(fields["rubrics"]), fields["source"] or "", ids))
        return problems

    def setup(self, stage: str | None = None) -> None:
        if self.train_problems:
            return
        from transformers import AutoTokenizer

        if self.hparams.tokenizer is None:
            raise ValueError("ProofRLDataModule needs `data.tokenizer` (qed-fit links it to model.model_name_or_path).")
        problems = self.load_problems(AutoTokenizer.from_pretrained(self.hparams.tokenizer))
        random.Random(self.hparams.seed).shuffle(problems)
        n_val = self.hparams.val_size
        if n_val >= len(problems):
            raise DataError(f"{self.hparams.path}: data.val_size={n_val} leaves no training problems out of {len(problems)}.")
        self.val_problems, self.train_problems = problems[:n_val], problems[n_val:]
        rank_zero_info(f"RL data: {len(self.train_problems)} train and {len(self.val_problems)} validation problems from {self.hparams.path}")

    def _batches(self, problems: list[ProofProblem], shuffle: bool) -> ProblemBatches:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return ProblemBatches(problems, self.hparams.prompts_per_step, self.hparams.seed, shuffle, rank, world)

    def train_dataloader(self) -> ProblemBatches:
        return self._batches(self.train_problems, shuffle=True)

    def val_dataloader(self) -> ProblemBatches | list:
        return self._batches(self.val_problems, shuffle=False) if self.val_problems else []
