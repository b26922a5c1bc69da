"""Stage 2 through the real entry point, with the vLLM CPU engine and the scripted judge over HTTP."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qed_lightning.cli import make_cli
from qed_lightning.rewards import GradeCache
from runs import read_metrics, series

REPO = Path(__file__).resolve().parents[2]




def _run(tiny_model_dir: Path, root: Path, *overrides: str) -> list[dict[str, float]]:
    make_cli(args=[
        "--config", str(REPO / "configs/demo/rl.yaml"),
        "--trainer.default_root_dir", str(root),
        "--model.init_args.model_name_or_path", str(tiny_model_dir),
        "--model.init_args.export_dir", str(root / "hf"),
        "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"),
        *overrides,
    ])
    return read_metrics(root)


def _validate(tiny_model_dir: Path, root: Path, model: Path, *overrides: str) -> float:
    """`qed-fit validate` of the demo config with `model` as the starting model; its val/reward_mean."""
    make_cli(args=["validate", "--config", str(REPO / "configs/demo/rl.yaml"), "--trainer.default_root_dir", str(root),
                   "--model.init_args.model_name_or_path", str(model),
                   "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
                   "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"), *overrides])
    (metrics,) = (root / "validate").glob("version_*/metrics.csv")
    with open(metrics) as fh:
        (value,) = [float(r["val/reward_mean"]) for r in csv.DictReader(fh) if r.get("val/reward_mean")]
    return value


@pytest.mark.slow
def test_demo_rl_steps_sync_weights_and_log_everything(tiny_model_dir, tmp_path):
    # data.seed differs from model.seed: both are logged with the whole config, no hparam merge to clash in
    rows = _run(tiny_model_dir, tmp_path, "--trainer.max_steps", "3", "--data.init_args.seed", "5")
    steps = series(rows, "rollout/reward_mean")
    assert len(steps) == 3
    for key in ["train/loss", "train/grad_norm", "rollout/reward_std", "rollout/zero_adv_group_frac",
                "rollout/response_len_mean", "rollout/truncated_frac", "judge/latency_mean_s", "judge/error",
                "judge/parse_fail", "judge/score_0", "train/tokens_per_sec", "rollout/logprob_diff_max"]:
        assert len(series(rows, key)) == 3, key
    # 4 prompts x G=4 per step: each graded by the scripted judge over HTTP, or (an empty response) scored 0 as
    # truncated without a judge call; no failures
    ok, truncated = series(rows, "judge/ok"), series(rows, "judge/truncated")
    assert [a + b for a, b in zip(ok, truncated)] == [16.0, 16.0, 16.0] and min(ok) > 0
    assert sum(series(rows, "judge/error")) + sum(series(rows, "judge/parse_fail")) == 0
    # the engine gets the new weights after each step: sampler and trainer log-probs agree (on-policy)
    assert max(series(rows, "rollout/logprob_diff_max")) < 1e-3
    assert series(rows, "rollout/policy_version") == [1.0, 2.0, 3.0]  # one push after each optimizer step
    assert series(rows, "val/reward_mean")  # the held-out problems were graded
    # the judge's grades were stored in the persistent cache: this process's shard, read back by a new cache
    cache = GradeCache(tmp_path / "grades.sqlite")
    assert [p.name for p in cache.shards()] == ["grades.rank0.jsonl"] and len(cache) > 0
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    assert series(rows, "rollout/sequences") == [16.0, 16.0, 16.0]  # data.prompts_per_step 4 x G=4, the whole job's

    # `validate --ckpt_path` scores the checkpoint's weights (pushed to the engine), not the starting model's: the
    # same as validating with those weights as the starting model, and not what the starting model scores
    from_ckpt = _validate(tiny_model_dir, tmp_path, tiny_model_dir, "--data.init_args.seed", "5",
                          "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"))
    from_export = _validate(tiny_model_dir, tmp_path / "export", tmp_path / "hf", "--data.init_args.seed", "5")
    from_start = _validate(tiny_model_dir, tmp_path / "start", tiny_model_dir, "--data.init_args.seed", "5")
    assert from_ckpt == pytest.approx(from_export, abs=1e-9) and from_ckpt != pytest.approx(from_start, abs=1e-3)
    assert [p.name for p in (tmp_path / "csv").iterdir()] == ["version_0"]  # the curves hold the training run only


@pytest.mark.slow
def test_rubric_rl_raises_mean_reward_on_a_learnable_judge(tiny_model_dir, tmp_path):
    """Learning test. Task: the scripted judge scores a response by its share of vowels (rule char_fraction,
    charset aeiouAEIOU: score = round(7 * share)), a property the tiny model can learn by shifting its token
    distribution. From the random tiny model (seed 0), 30 steps of 4 prompts x G=8, 24 new tokens, lr 3e-3:
    measured mean reward 0.28 over the first 5 steps and 0.65 over the last 5 (0.57 with the earlier padded,
    full-logits training pass: the same gradient up to float32 rounding, which changes later samples). Threshold:
    +0.15."""
    rows = _run(
        tiny_model_dir, tmp_path,
        "--trainer.max_steps", "30", "--model.init_args.group_size", "8", "--model.init_args.max_new_tokens", "24",
        "--model.init_args.optimizer.init_args.lr", "3e-3", "--data.init_args.val_size", "0",
        "--model.init_args.export_hf", "false",
    )
    rewards = series(rows, "rollout/reward_mean")
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards


@pytest.mark.slow
def test_micro_batch_layouts_give_the_same_step(tiny_model_dir, tmp_path):
    """One step on the same (seeded) rollouts: right-padded rows, and each prompt run once with its completions
    attending to its cached keys/values (shared_prefix, the CPU default), give the same loss and gradient norm;
    "auto" under gradient checkpointing (which drops the cache) falls back to padded rows; and the LM head in
    chunks of completion tokens (the default) gives what all logits at once give (logits_chunk_tokens 0)."""
    runs = {}
    for name, extra in [("padded", ["--model.init_args.micro_batch_layout", "padded"]),
                        ("shared_prefix", ["--model.init_args.micro_batch_layout", "shared_prefix"]),
                        ("auto+checkpointing", ["--model.init_args.gradient_checkpointing", "true"]),
                        ("full-logits", ["--model.init_args.logits_chunk_tokens", "0"])]:
        rows = _run(tiny_model_dir, tmp_path / name.replace("+", "_"), "--trainer.max_steps", "1",
                    "--data.init_args.val_size", "0", "--model.init_args.export_hf", "false", *extra)
        runs[name] = {k: series(rows, k)[0] for k in ("train/loss", "train/grad_norm", "rollout/response_len_mean",
                                                         "train/micro_batches", "rollout/logprob_diff_max")}
    padded, shared = runs["padded"], runs["shared_prefix"]
    assert shared["rollout/response_len_mean"] == padded["rollout/response_len_mean"]  # the same rollouts
    assert shared["train/micro_batches"] > padded["train/micro_batches"]  # one prompt per micro-batch
    assert padded["train/grad_norm"] > 0
    for key in ("train/loss", "train/grad_norm"):
        assert shared[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), key
    assert shared["rollout/logprob_diff_max"] < 1e-3  # trainer and sampler agree in the new layout too
    for key in ("train/loss", "train/grad_norm"):
        assert runs["full-logits"][key] == pytest.approx(shared[key], rel=1e-4, abs=1e-6), key
    fallback = runs["auto+checkpointing"]
    assert fallback["train/micro_batches"] == padded["train/micro_batches"]
    assert fallback["train/loss"] == pytest.approx(padded["train/loss"], rel=1e-4, abs=1e-6)
