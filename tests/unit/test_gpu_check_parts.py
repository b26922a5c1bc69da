"""The GPU check's pure parts, by hand: model FLOPs (the MFU numerator), packed rows, synthetic rollouts and the
micro-batch budget search, the pass/fail rules over a results JSON, the time budgets (their sum within the cap, a
process past its time cut with its children), and the attention comparison of section 7 on CPU (eager vs sdpa: the
code path `flash_attention_2` takes on the GPU)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import time
from pathlib import Path

import pytest

from qed_lightning.data.chat import IGNORE_INDEX
from qed_lightning.gpu_check.measure import CPU, GPU, QWEN3_06B, flash_attention, model_flops, packed_row
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
    ok = {"status": "ok", "precision": {"changed_fraction": 0.9995},
          "rl": {"micro_batches": [1, 4], "grad_norm": [2.0, 2.001], "update_rel_diff_1_vs_4": 0.004,
                 "update_rel_diff_vs_none": 0.01}}
    lost = {"status": "ok", "precision": {"changed_fraction": 0.9995},
            "rl": {"micro_batches": [1, 4], "grad_norm": [2.0, 1.36], "update_rel_diff_1_vs_4": 0.88,
                   "update_rel_diff_vs_none": 0.01}}
    bf16 = {"status": "ok", "precision": {"changed_fraction": 0.02}}
    got = _script().checks({"strategies": {"zero2": ok, "zero3": lost, "pure_bf16": bf16,
                                           "fsdp2": {"status": "cut"}}})
    assert got == {"zero2_precision": True, "zero2_rl_1_vs_4": True, "zero2_rl_vs_none": True, "zero3_precision": True,
                   "zero3_rl_1_vs_4": False, "zero3_rl_vs_none": True, "pure_bf16_precision": True, "fsdp2_ran": False}


def test_time_budgets_fit_the_cap_and_the_launchers_timeout():
    script = _script()
    limits = re.search(r"LIMIT=(\d+)\nelse .* LIMIT=(\d+); fi", (REPO / "scripts/gpu_check.sh").read_text())
    for scale, limit in ((CPU, int(limits[1])), (GPU, int(limits[2]))):
        assert list(scale.budgets) == list(script.SECTIONS)
        assert list(scale.strategy_budgets) == list(script.STRATEGIES)
        assert sum(scale.budgets.values()) < scale.cap < limit  # the shell's `timeout` only backs the cap up
        assert scale.budgets["strategies"] > sum(scale.strategy_budgets.values())  # plus the model's saving
    assert GPU.cap + 10 <= limit <= 480  # 8 minutes on the GPU, the wheels' install included
    more = script.with_budgets(GPU, ["zero3=100", "gemm=5"])
    assert more.strategy_budgets["zero3"] == 100 and more.budgets["gemm"] == 5
    assert more.budgets["strategies"] == GPU.budgets["strategies"] + 100 - GPU.strategy_budgets["zero3"]
    with pytest.raises(ValueError, match="no section or strategy 'zero4'"):
        script.with_budgets(GPU, ["zero4=3"])


def test_a_process_past_its_budget_is_cut_with_its_children(tmp_path):
    script = _script()
    marker = tmp_path / "grandchild.pid"
    child = ("import subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
             f" open({str(marker)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    started = time.perf_counter()
    status, used = script.run_bounded([sys.executable, "-c", child], tmp_path / "log", 2.0)
    assert status == "cut" and 2.0 <= used < 10 and time.perf_counter() - started < 10
    assert "started" in (tmp_path / "log").read_text()
    grandchild = int(marker.read_text())
    for _ in range(50):  # killed with the group (a zombie until init reaps it counts as gone)
        try:
            os.kill(grandchild, 0)
            state = Path(f"/proc/{grandchild}/stat").read_text().split()[2]
        except (ProcessLookupError, FileNotFoundError):
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the cut process's child is still running")
    assert script.run_bounded([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log", 30)[0] == "exit 3"
    report = script.outcome("cut", tmp_path / "log", 20, 25.04, 25.1)
    assert report["status"] == "cut" and report["budget_s"] == 20 and report["allowed_s"] == 25.0
    assert script.describe(report).startswith("CUT at 25.1 s (budget 20 s, 25.0 s allowed")


def test_attention_backends_compared_on_a_packed_row():
    """Section 7's comparison with eager in flash_attention_2's place: the packed row keeps its documents apart
    (logits as each document alone, to bf16 rounding), the same loss and gradients; flash-attn itself is skipped
    here with the reason."""
    out = flash_attention(CPU, attn="eager")
    assert out["documents"] > 1 and set(out["runs"]) == {"eager", "sdpa"}
    assert out["runs"]["eager"]["loss"] == pytest.approx(out["runs"]["sdpa"]["loss"], rel=1e-3)
    assert out["logits_gap_vs_sdpa_alone_mean"] < 5e-3 and out["sdpa_packed_gap_mean"] < 5e-3
    assert out["grad_rel_diff_vs_sdpa"] < 0.05
    if importlib.util.find_spec("flash_attn") is None:
        assert "flash_attn does not import" in flash_attention(CPU)["skipped"]
