"""The GPU check's pure parts, by hand: model FLOPs (the MFU numerator), packed rows, synthetic rollouts and the
micro-batch budget search, and the pass/fail rules over a results JSON."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from qed_lightning.data.chat import IGNORE_INDEX
from qed_lightning.gpu_check.measure import QWEN3_06B, model_flops, packed_row
from qed_lightning.gpu_check.rl_step import budget_for, synthetic_rollouts

REPO = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check_script", REPO / "scripts/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_flops_by_hand():
    shape = dict(hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=2, vocab_size=10)
    # per layer: q (4x4) + k (4x2) + v (4x2) + o (4x4) = 48, MLP 3 x 4 x 8 = 96 -> 144; 2 layers + head 10 x 4 = 328
    # matmul: 6 x 328 x (3 + 2) tokens = 9840; attention: 2 layers x 6 x (9 + 4) x 2 heads x 2 = 624
    assert model_flops(shape, [3, 2]) == 9840 + 624
    # Qwen3-0.6B: ~0.6B matmul parameters with its head, so ~3.6 GFLOP per token before attention
    assert 3.5e9 < model_flops(QWEN3_06B, [1]) < 3.8e9


def test_packed_row_labels_all_but_each_documents_first_token():
    batch, docs = packed_row(50, vocab=100, docs=(8, 16), seed=3)
    assert sum(docs) == 50 and all(1 <= n <= 16 for n in docs)
    starts = (batch["position_ids"][0] == 0).nonzero().reshape(-1).tolist()
    assert starts == [sum(docs[:i]) for i in range(len(docs))]
    assert (batch["labels"][0, starts] == IGNORE_INDEX).all()
    assert (batch["labels"] != IGNORE_INDEX).sum() == 50 - len(docs)


def test_synthetic_rollouts_and_the_budget_search():
    rollouts, rewards = synthetic_rollouts(vocab=500, prompts=2, group=4, prompt_tokens=5, lengths=(3, 9))
    assert len(rollouts) == 8 and rollouts[0].prompt_ids == rollouts[3].prompt_ids != rollouts[4].prompt_ids
    assert rollouts[0].logprobs[0] == pytest.approx(-math.log(500))
    assert rewards[:4] == pytest.approx([0, 1 / 3, 2 / 3, 1]) and len(set(rewards[4:])) == 4  # every group has signal
    from qed_lightning.rl.microbatch import plan_microbatches

    lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
    for target in (1, 4):
        assert len(plan_microbatches(lengths, budget_for(rollouts, target), "padded")) <= target
    assert len(plan_microbatches(lengths, budget_for(rollouts, 4), "padded")) > 1


def test_checks_flag_a_lost_micro_batch_and_bf16_masters():
    ok = {"precision": {"changed_fraction": 0.9995}, "rl": {"micro_batches": [1, 4], "grad_norm": [2.0, 2.001],
                                                             "update_rel_diff_1_vs_4": 0.004, "update_rel_diff_vs_none": 0.01}}
    lost = {"precision": {"changed_fraction": 0.9995}, "rl": {"micro_batches": [1, 4], "grad_norm": [2.0, 1.36],
                                                               "update_rel_diff_1_vs_4": 0.88, "update_rel_diff_vs_none": 0.01}}
    bf16 = {"precision": {"changed_fraction": 0.02}}
    got = _script().checks({"strategies": {"zero2": ok, "zero3": lost, "pure_bf16": bf16, "fsdp2": {"error": 1}}})
    assert got == {"zero2_precision": True, "zero2_rl_1_vs_4": True, "zero2_rl_vs_none": True, "zero3_precision": True,
                   "zero3_rl_1_vs_4": False, "zero3_rl_vs_none": True, "pure_bf16_precision": True, "fsdp2_ran": False}
