"""A sampled table of an RL step's rollouts, sent to an experiment tracker every N steps.

Each `configs/logger/*.yaml` adds one of these for its own tracker (`to`): a W&B Table, a TensorBoard text entry
(a markdown table), or an MLflow JSON artifact (`rollouts/step_NNNNNN.json`). The rows are the step's rollout records
(`RubricRLModule.last_rollouts`, as written to `<run>/rollouts/`), spread evenly over the step, with the proof and
the judge reply cut to `max_chars`; the full texts stay in the run's rollout files and in `qed-report`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

__all__ = ["COLUMNS", "RolloutTable", "table_rows"]

log = logging.getLogger(__name__)

COLUMNS = ("step", "problem_id", "sample", "score", "reward", "advantage", "status", "completion_tokens", "proof",
           "judge_reply")
_LOGGERS = {"wandb": "WandbLogger", "tensorboard": "TensorBoardLogger", "mlflow": "MLFlowLogger"}


def table_rows(records: list[dict[str, Any]], rows: int, max_chars: int) -> list[list[Any]]:
    """`rows` records spread evenly over `records`, as lists in `COLUMNS` order, long texts cut to `max_chars`."""
    if len(records) > rows:
        records = [records[round(k * (len(records) - 1) / max(rows - 1, 1))] for k in range(rows)]

    def cell(record: dict[str, Any], key: str) -> Any:
        value = record.get(key)
        if key == "proof" and value is None:
            value = record.get("completion", "")
        if isinstance(value, str) and len(value) > max_chars:
            value = value[:max_chars] + f" [... {len(value) - max_chars} more characters]"
        return value

    return [[cell(r, key) for key in COLUMNS] for r in records]


def _markdown(rows: list[list[Any]]) -> str:
    def clean(value: Any) -> str:  # one table row per rollout: every line break and control space becomes a space
        return "" if value is None else " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(clean(v) for v in row) + " |" for row in rows])


class RolloutTable(Callback):
    """Every `every_n_steps` optimizer steps, log `rows` of the step's rollouts to the `to` logger.

    Args:
        to: which tracker: "wandb" (a Table), "tensorboard" (text) or "mlflow" (a JSON artifact).
        every_n_steps: steps between tables (the first step always logs one).
        rows: rollouts per table. max_chars: characters kept of the proof and of the judge reply.
    """

    def __init__(self, to: Literal["wandb", "tensorboard", "mlflow"], every_n_steps: int = 10, rows: int = 16,
                 max_chars: int = 2000) -> None:
        if every_n_steps < 1 or rows < 1:
            raise ValueError(f"RolloutTable needs every_n_steps >= 1 and rows >= 1, got {every_n_steps} and {rows}")
        self.to, self.every_n_steps, self.rows, self.max_chars = to, every_n_steps, rows, max_chars
        self.logged_steps: list[int] = []

    def _logger(self, trainer: L.Trainer):
        wanted = _LOGGERS[self.to]
        return next((lg for lg in trainer.loggers if type(lg).__name__ == wanted), None)

    @override
    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        from qed_lightning.modules.rubric_rl import RubricRLModule

        records = pl_module.last_rollouts if isinstance(pl_module, RubricRLModule) else []  # only RL keeps rollouts
        step = records[0]["step"] if records else None
        if step is None or step % self.every_n_steps or step in self.logged_steps:
            return
        logger = self._logger(trainer)
        if logger is None:
            log.warning("RolloutTable(to=%r): the run has no %s; add its logger (configs/logger/%s.yaml)",
                        self.to, _LOGGERS[self.to], self.to)
            self.every_n_steps = 1 << 62  # say it once
            return
        rows = table_rows(records, self.rows, self.max_chars)
        if self.to == "wandb":
            logger.log_table(key="rollouts", columns=list(COLUMNS), data=rows, step=trainer.global_step)
        elif self.to == "tensorboard":
            logger.experiment.add_text("rollouts", _markdown(rows), global_step=step)
        else:
            logger.experiment.log_dict(logger.run_id, {"columns": list(COLUMNS), "data": rows},
                                       f"rollouts/step_{step:06d}.json")
        self.logged_steps.append(step)
