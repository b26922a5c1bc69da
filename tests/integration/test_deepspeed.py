"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (DeepSpeed's CPU accelerator, gloo), through the real entry point: 2 processes
train exactly as 1 process without DeepSpeed.

Each run is `qed-fit ... --config configs/strategy/deepspeed_zero{2,3}.yaml --trainer.devices 2` in a subprocess
(`qed_lightning.parallel.DeepSpeedStrategy` lets the presets run on CPU). The baseline is 1 process under DDP with
the same global batch (so the same `DistributedSampler` order, see test_distributed.py).

RL: one step of 2 ranks x 2 prompts x G=2 against 1 x 4 prompts, with 1 micro-batch per rank and with 4 (a budget of
one token: every sequence alone). SGD at lr 10, so the update is the clipped gradient itself (Adam's first step,
about lr x sign(g), would hide a wrong gradient scale); `grad_clip` 0.3 is below the gradient norm, so DeepSpeed's
clipping is compared with ours too. Without `PolicyUpdate.before_pass` this test fails with 4 micro-batches: ZeRO-2
(a boundary at every pass) and ZeRO-3 (its micro-step never advances: our passes bypass `DeepSpeedEngine.forward`)
both keep only the last micro-batch's gradient (measured: a gradient norm of 1.64 against 2.41).
SFT: 2 steps of 2 ranks x 2 rows against 1 x 4 rows, same losses and weights.
Tolerance 1e-5 (float32): measured differences are float32 summation order (another reduction, another GEMM shape).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runs import REPO, fit_subprocess, series

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
TOL = 1e-5
SGD = '{"class_path": "torch.optim.SGD", "init_args": {"lr": 10.0}}'  # RL: the update is 10x the clipped gradient
SGD_SFT = '{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}'


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "hf" / "model.safetensors"))


def _rl(tiny: Path, root: Path, strategy: str, devices: int, prompts: int, budget: int) -> list[dict[str, float]]:
    return fit_subprocess(
        root, "--config", str(REPO / "configs/demo/rl.yaml"),
        "--config", str(REPO / f"configs/strategy/{strategy}.yaml"),
        "--trainer.devices", str(devices), "--data.init_args.prompts_per_step", str(prompts),
        "--trainer.max_steps", "1", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
        "--model.init_args.export_dir", str(root / "hf"),
        "--model.init_args.model_name_or_path", str(tiny), "--model.init_args.max_new_tokens", "12",
        "--model.init_args.group_size", "2", "--model.init_args.micro_batch_tokens", str(budget),
        "--model.init_args.micro_batch_layout", "padded", "--model.init_args.optimizer", SGD,
        "--model.init_args.engine", '{"class_path": "qed_lightning.rollout.HFEngine"}',
        "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"), "--data.init_args.val_size", "0")


def _assert_same_update(root: Path, baseline: Path, initial: dict[str, torch.Tensor]) -> None:
    got, want = _weights(root), _weights(baseline)
    assert set(got) == set(want)
    for name, w in want.items():
        torch.testing.assert_close(got[name] - initial[name], w - initial[name], atol=TOL, rtol=0, msg=name)
    moved = sum(int((w != initial[k]).sum()) for k, w in want.items()) / sum(w.numel() for w in want.values())
    assert moved > 0.9  # the step changed (nearly) every weight: the comparison is not of two no-ops


@pytest.fixture(scope="module")
def rl_baseline(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_rl") / "one"
    rows = _rl(tiny_model_dir, root, "ddp", 1, 4, 4096)
    assert series(rows, "train/micro_batches") == [1.0]
    return root, rows


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_rl_step_under_zero_matches_one_process(strategy, micro_batches, rl_baseline, tiny_model_dir, tmp_path):
    baseline, base_rows = rl_baseline
    rows = _rl(tiny_model_dir, tmp_path / "run", strategy, 2, 4, 4096 if micro_batches == 1 else 1)
    assert series(rows, "train/micro_batches") == [float(micro_batches)]  # per rank: 2 prompts x G=2
    for key in ("train/loss", "train/grad_norm", "rollout/reward_mean"):  # same samples, same loss and norm
        assert series(rows, key) == pytest.approx(series(base_rows, key), rel=TOL, abs=TOL), key
    assert series(base_rows, "train/grad_norm")[0] > 0.3  # clipped: DeepSpeed's clip is compared with ours
    _assert_same_update(tmp_path / "run", baseline, load_file(str(tiny_model_dir / "model.safetensors")))


def _sft(tiny: Path, root: Path, strategy: str, devices: int, rows_per_rank: int) -> list[dict[str, float]]:
    return fit_subprocess(
        root, "--config", str(REPO / "configs/demo/sft.yaml"),
        "--config", str(REPO / f"configs/strategy/{strategy}.yaml"),
        "--trainer.devices", str(devices), "--data.init_args.batch_size", str(rows_per_rank),
        "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
        "--model.init_args.export_dir", str(root / "hf"),
        "--model.init_args.model_name_or_path", str(tiny), "--model.init_args.optimizer", SGD_SFT,
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_sft.jsonl"))


def test_sft_under_zero2_and_zero3_matches_one_process(tiny_model_dir, tmp_path):
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    want = series(_sft(tiny_model_dir, tmp_path / "one", "ddp", 1, 4), "train/loss")
    assert len(want) == 2 and want[0] != want[1]
    for strategy in ("deepspeed_zero2", "deepspeed_zero3"):
        got = series(_sft(tiny_model_dir, tmp_path / strategy, strategy, 2, 2), "train/loss")
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=TOL, rtol=0, msg=strategy)
        _assert_same_update(tmp_path / strategy, tmp_path / "one", initial)
