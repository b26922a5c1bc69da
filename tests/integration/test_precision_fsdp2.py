"""The paper configs' precision path on CPU, through the real entry point: 2 processes FSDP2 (gloo), bf16 compute on
fp32 master weights, one AdamW step at the paper's RL lr of 1e-6 changes (almost) every weight; the pure-bf16 opt-in
changes few of them, and says why.

The trainer precision and the weights' dtype are read from configs/sft.yaml and configs/rl.yaml (they must agree), and
composed with the CPU demo SFT config, the FSDP2 preset and the tiny model. Expected: an AdamW first step moves each
weight by ~lr = 1e-6, which float32 keeps for |w| up to ~8 and bf16 rounds away for |w| >= 2^-11
(qed_lightning.model.precision): ~98% of the tiny model's weights (std 0.02, RMSNorm weights 1.0) cannot move in
bf16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from runs import REPO, fit_subprocess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ADAMW = '{"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-6, "weight_decay": 0.01}}'


def _paper_precision() -> tuple[str, str]:
    settings = set()
    for name in ("sft", "rl", "rc"):
        config = yaml.safe_load((REPO / f"configs/{name}.yaml").read_text())
        settings.add((config["trainer"]["precision"], config["model"]["init_args"]["dtype"]))
    (setting,) = settings  # one precision path for every stage
    return setting


def _one_step(tiny: Path, root: Path, precision: str, dtype: str, *extra: str) -> tuple[dict, Path]:
    fit_subprocess(root, "--config", str(REPO / "configs/demo/sft.yaml"),
                   "--config", str(REPO / "configs/strategy/fsdp2.yaml"),
                   "--trainer.devices", "2", "--trainer.max_steps", "1", "--trainer.precision", precision,
                   "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
                   "--model.init_args.dtype", dtype, "--model.init_args.model_name_or_path", str(tiny),
                   "--model.init_args.export_dir", str(root / "hf"), "--model.init_args.optimizer", ADAMW,
                   "--model.init_args.lr_scheduler", "null", "--data.init_args.batch_size", "2",
                   "--data.init_args.path", str(REPO / "data/samples/fineproofs_sft.jsonl"), *extra)
    return load_file(str(root / "hf" / "model.safetensors")), root.with_suffix(".log")


def _changed(after: dict, before: dict) -> float:
    moved = sum(int((after[k] != before[k].to(after[k].dtype)).sum()) for k in after)
    return moved / sum(t.numel() for t in after.values())


def test_paper_precision_moves_every_weight_and_pure_bf16_does_not(tiny_model_dir, tmp_path):
    precision, dtype = _paper_precision()
    assert (precision, dtype) == ("bf16-mixed", "float32")
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    after, _ = _one_step(tiny_model_dir, tmp_path / "paper", precision, dtype)
    assert all(t.dtype == torch.float32 for t in after.values())  # the masters stay fp32
    assert _changed(after, initial) >= 0.99

    after, log = _one_step(tiny_model_dir, tmp_path / "bf16", "bf16-true", "bfloat16",
                           "--model.init_args.pure_bf16", "true")
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    lost = _changed(after, initial)
    assert lost < 0.1, lost  # measured: a few percent of the weights moved
    text = log.read_text()
    assert "model.pure_bf16: the weights are trained in bf16 without an fp32 master copy" in text
    assert "every weight with |w| >= 0.000488 stays unchanged" in text
