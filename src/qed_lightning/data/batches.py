"""The RL loader: each step's problems in a seeded order per epoch, resumable exactly where a checkpoint left off.

A batch is one RL step's problems: `batch_size` prompts, then `spares` spare candidates (marked `spare=True`) that
dynamic sampling (`model.skip_flat_groups`) draws from when groups come out flat. Spares are part of the batch, so
the data order, and so the resume, do not depend on which groups came out flat: a step consumes its batch whatever
it generated. Without dynamic sampling `spares` is 0 and a batch is the step's prompts.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING

from qed_lightning.seeds import derive_seed

if TYPE_CHECKING:
    from qed_lightning.data.records import ProofProblem

__all__ = ["ProblemBatches"]


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
                 rank: int = 0, world_size: int = 1, spares: int = 0) -> None:
        self.problems, self.batch_size, self.seed, self.shuffle = problems, batch_size, seed, shuffle
        self.rank, self.world_size, self.spares = rank, world_size, spares
        self.epoch, self.consumed, self._resume_at, self._started = 0, 0, 0, False

    @property
    def width(self) -> int:
        """Problems per batch on one rank: the step's prompts and its spares."""
        return self.batch_size + self.spares

    def _order(self, epoch: int) -> list[ProofProblem]:
        order = list(self.problems)
        if self.shuffle:
            random.Random(derive_seed(self.seed, "epoch", epoch)).shuffle(order)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank (a data-parallel step needs all ranks): full batches only,
        the remainder waits for the next epoch's order; a dataset smaller than one global batch gives one
        partial batch."""
        full = len(self.problems) // (self.width * self.world_size)
        return full if full > 0 else 1

    def _batch(self, order: list[ProofProblem], pos: int) -> list[ProofProblem]:
        chunk = order[pos * self.width : (pos + 1) * self.width]
        return chunk[: self.batch_size] + [replace(p, spare=True) for p in chunk[self.batch_size :]]

    def __iter__(self):
        if self._started:
            self.epoch += 1
        self._started = True
        start, self._resume_at = self._resume_at, 0
        mine = self._order(self.epoch)
        self.consumed = start
        for pos in range(start, len(self)):
            self.consumed = pos + 1
            yield self._batch(mine, pos)

    def peek(self) -> list[ProofProblem] | None:
        """The prompts of the batch the running pass yields next, without consuming it (None at the end of a pass):
        what `AsyncRollouts` generates while the current step trains. Spares are left out: they are generated
        only when the step needs them."""
        if not self._started or self.consumed >= len(self):
            return None
        return self._batch(self._order(self.epoch), self.consumed)[: self.batch_size]

    def problem_at(self, n: int) -> ProofProblem:
        """The n-th problem of this rank's run-long order: the problems of each epoch's full batches (prompts and
        spares alike), epochs one after another. The streaming layout (`rollout.streaming`) reads the data through it
        with its own cursor, saved in its checkpoint state; there a group rejected by dynamic sampling is replaced
        by the next problem of this order, so no problem is marked spare."""
        mine = self.problems[self.rank :: self.world_size]
        per_epoch = min(len(self) * self.width, len(mine))  # a dataset smaller than one batch: epochs of all of it
        epoch, pos = divmod(n, per_epoch)
        return self._order(epoch)[pos]

    def state_dict(self) -> dict[str, int]:
        if self._started and self.consumed >= len(self):
            return {"epoch": self.epoch + 1, "consumed": 0, "seed": self.seed}
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._resume_at, self._started = int(state["epoch"]), int(state["consumed"]), False
