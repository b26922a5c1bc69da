"""The run's whole config, and the judge and prompt versions, recorded as hyperparameters by every logger.

Lightning logs a module's `hparams` only, and the RL modules keep their components (engine, judge, optimizer) out of
them (`save_hyperparameters(ignore=...)`), so W&B, TensorBoard or MLflow would not show which judge graded a run.
`LogConfigCallback` (LightningCLI's `SaveConfigCallback`, which also writes `config.yaml`) logs the parsed config
flattened to dotted keys under `config/` (MLflow truncates a value to 250 characters, so one YAML blob would be cut),
and under `qed/` what identifies the run's grading and prompts: the judge's model and prompt version
(`name@sha8`, the same string that keys the grade cache), the policy prompt's version, the reasoning-cache prompts'
versions, and the package versions.
"""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback

__all__ = ["LogConfigCallback", "flatten", "run_versions"]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys; lists and other values as they are (loggers stringify them).

    >>> flatten({"model": {"init_args": {"lr": 1e-3}}, "seed": 0})
    {'model.init_args.lr': 0.001, 'seed': 0}
    """
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def run_versions(pl_module: L.LightningModule, datamodule: L.LightningDataModule | None) -> dict[str, str]:
    """What identifies a run's grading and prompts (see the module docstring)."""
    from qed_lightning.modules.rc_rl import ReasoningCacheRLModule
    from qed_lightning.modules.rubric_rl import RubricRLModule

    out = {"qed/qed_lightning": _package("qed-lightning"), "qed/torch": _package("torch"),
           "qed/lightning": _package("lightning"), "qed/transformers": _package("transformers")}
    if isinstance(pl_module, RubricRLModule):
        out.update({"qed/judge": type(pl_module.judge).__name__, "qed/judge_model": pl_module.judge.client.model_name,
                    "qed/judge_prompt": pl_module.judge.prompt.version, "qed/engine": type(pl_module.engine).__name__})
    if isinstance(pl_module, ReasoningCacheRLModule):
        out.update({"qed/rc_reasoning_prompt": pl_module.rc.reasoning_prompt.version,
                    "qed/rc_summary_prompt": pl_module.rc.summary_prompt.version})
    template = getattr(getattr(datamodule, "hparams", None), "prompt_template", None)
    if template:
        out["qed/policy_prompt"] = f"policy@{hashlib.sha256(template.encode('utf-8')).hexdigest()[:8]}"
    return out


class LogConfigCallback(SaveConfigCallback):
    """`SaveConfigCallback` that also logs the config and `run_versions` to every logger (rank zero)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.loggers:
            return
        config = {f"config/{k}": v for k, v in flatten(self.config.as_dict()).items() if k != "config"}
        params = {**run_versions(pl_module, trainer.datamodule), **config}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
