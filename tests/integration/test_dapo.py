"""`configs/demo/rl_dapo.yaml` through `qed-fit`: the difficulty range, dynamic sampling and the overlong options
together; every trained group has reward variance, and a run stopped after 2 steps and resumed from its checkpoint
ends with the same weights as an uninterrupted 4-step run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qed_lightning.cli import make_cli
from runs import read_metrics, series

REPO = Path(__file__).resolve().parents[2]


def _fit(tiny: Path, root: Path, steps: int, *extra: str) -> None:
    make_cli(args=[
        "--config", str(REPO / "configs/demo/rl_dapo.yaml"),
        "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
        "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
        "--model.init_args.model_name_or_path", str(tiny), "--model.init_args.export_dir", str(root / "hf"),
        "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
        "--model.init_args.engine", "qed_lightning.rollout.HFEngine", "--model.init_args.max_new_tokens", "24",
        "--model.init_args.overlong_buffer", "8",
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"), *extra,
    ])


@pytest.mark.slow
def test_dynamic_sampling_with_the_difficulty_range_trains_on_signal_and_resumes_exactly(tiny_model_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _fit(tiny_model_dir, straight, 4)
    rows = read_metrics(straight)
    # 24 samples: reward_mean 0.0 and the 7 above 0.95 fall outside [0.05, 0.95]
    assert (series(rows, "data/difficulty_kept"), series(rows, "data/difficulty_dropped")) == ([16.0], [8.0])
    generated, kept = series(rows, "rollout/groups_generated"), series(rows, "rollout/groups_kept")
    assert len(kept) == 4 and all(2 <= g <= 4 for g in generated)  # 2 prompts, at most 2 spares per step
    assert max(generated) > 2  # flat groups were refilled from the spares (measured: 2, 4, 3, 2 groups generated)
    assert series(rows, "rollout/rollouts_judged") == [4.0 * g for g in generated]  # G = 4
    for step, (k, flat) in enumerate(zip(kept, series(rows, "rollout/zero_adv_group_frac"), strict=True)):
        assert k == 0 or flat == 0.0, (step, k, flat)  # the trained groups all have reward variance

    _fit(tiny_model_dir, split, 2)
    _fit(tiny_model_dir, split, 4, "--ckpt_path", "last")
    a, b = load_file(str(straight / "hf" / "model.safetensors")), load_file(str(split / "hf" / "model.safetensors"))
    assert set(a) == set(b)
    for key in a:  # same data order, spares and seeds after the resume: only float summation order may differ
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(init[k], a[k]) for k in a)
