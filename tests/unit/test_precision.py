"""Precision and strategy checks at the door: bf16 weights lose small updates (the threshold by hand and against real
bf16 rounding), such weights and FSDP1 are refused before any weight loads, FSDP2 computes in bf16 on fp32 shards,
and DeepSpeed's optimizer offload gets its CPU Adam."""

from __future__ import annotations

import pytest
import torch

from qed_lightning.model.precision import fsdp2_policy, lost_update_threshold, lost_update_warning, weights_are_half
from qed_lightning.modules import SFTModule


def test_lost_update_threshold_by_hand_and_by_bf16_rounding():
    # lr 1e-6: log2(1e-6) = -19.93, + 8 = -11.93 -> e = -12 + 1 = -11: |w| >= 2^-11 rounds the update away
    assert lost_update_threshold(1e-6) == 2.0 ** -11
    # lr 1e-5: log2 = -16.61, + 8 = -8.61 -> e = -8
    assert lost_update_threshold(1e-5) == 2.0 ** -8
    for lr in (1e-6, 1e-5, 3e-4):
        t = lost_update_threshold(lr)
        at = torch.tensor([t, 1.5 * t, 1.99 * t], dtype=torch.bfloat16)  # at or above: the update is lost
        assert torch.equal((at.float() + lr).to(torch.bfloat16), at), lr
        below = torch.tensor([0.98 * t], dtype=torch.bfloat16)  # just below: half a step is under lr, it moves
        assert not torch.equal((below.float() + lr).to(torch.bfloat16), below), lr


def test_lost_update_warning_counts_the_weights_that_cannot_move():
    params = [torch.tensor([1e-4, 1e-3]), torch.tensor([[0.02, 1.0]])]  # 3 of 4 at or above 2^-11 = 4.9e-4
    text = lost_update_warning(params, 1e-6)
    assert "|w| >= 0.000488 stays unchanged, 75.0% of this model's weights" in text
    assert "trainer.precision=bf16-mixed with model.dtype=float32" in text


def test_which_settings_keep_half_weights_and_the_fsdp2_policy():
    assert not weights_are_half("float32", "bf16-mixed") and not weights_are_half("float32", "32-true")
    assert weights_are_half("bfloat16", "bf16-mixed") and weights_are_half("float32", "bf16-true")
    policy = fsdp2_policy("bf16-mixed")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp2_policy("32-true") is None and fsdp2_policy("bf16-true") is None


class _Trainer:
    def __init__(self, strategy, precision: str) -> None:
        self.strategy, self.precision = strategy, precision


def _setup(strategy, precision: str, **kwargs) -> None:
    module = SFTModule("unused", **kwargs)
    module._trainer = _Trainer(strategy, precision)
    module.setup("fit")


def test_bf16_weights_are_refused_unless_opted_in_or_under_deepspeed():
    plain = object()
    _setup(plain, "bf16-mixed")  # fp32 weights, bf16 compute: the paper configs' path
    _setup(plain, "32-true")
    with pytest.raises(ValueError,
                       match=r"model.dtype=bfloat16 with trainer.precision=bf16-mixed trains 16-bit weights"):
        _setup(plain, "bf16-mixed", dtype="bfloat16")
    with pytest.raises(ValueError, match=r"or set model.pure_bf16=true"):
        _setup(plain, "bf16-true")
    _setup(plain, "bf16-true", dtype="bfloat16", pure_bf16=True)  # the explicit opt-in (warned at fit start)

    from qed_lightning.parallel import DeepSpeedStrategy

    class _DeepSpeed(DeepSpeedStrategy):  # DeepSpeed's bf16 mode keeps fp32 masters whatever the module's dtype
        def __init__(self) -> None:  # skips Lightning's, which needs deepspeed installed
            pass

    _setup(_DeepSpeed(), "bf16-true", dtype="bfloat16")


def test_fsdp1_is_refused_naming_what_to_use():
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError) as info:
        _setup(FSDPStrategy(), "bf16-mixed")
    for name in ("FSDP1", "#19626", "configs/strategy/fsdp2.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
                 "deepspeed_zero3_offload.yaml"):
        assert name in str(info.value)


@pytest.mark.slow  # builds DeepSpeed's CPU Adam op on first use (a C++ compile, minutes on a fresh machine)
def test_offloaded_adamw_becomes_deepspeed_cpu_adam_with_the_same_update():
    pytest.importorskip("deepspeed")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from qed_lightning.parallel import DeepSpeedStrategy

    torch.manual_seed(0)
    start, grads = torch.randn(64, 32), [torch.randn(64, 32) for _ in range(3)]
    results = []
    for swap in (False, True):
        w = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([w], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        if swap:
            opt = DeepSpeedStrategy(stage=3, offload_optimizer=True).optimizer_for_offload(opt)
            assert isinstance(opt, DeepSpeedCPUAdam)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        results.append(w.detach())
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=1e-5)
    assert (results[0] - start).abs().min() > 0

    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    strategy = DeepSpeedStrategy(stage=3, offload_optimizer=True)
    assert strategy.optimizer_for_offload(sgd) is sgd and strategy.config["zero_force_ds_cpu_optimizer"] is False
    assert DeepSpeedStrategy(stage=2).optimizer_for_offload(sgd) is sgd  # nothing offloaded: untouched
