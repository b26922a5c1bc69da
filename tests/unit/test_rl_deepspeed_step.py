"""RubricRLModule under DeepSpeed (GPU only, so the strategy and engine are stand-ins with DeepSpeed's interface):
ZeRO keeps gradients out of `p.grad`, so `grad_clip` goes to DeepSpeed's `gradient_clipping` before the engine is
built, and the logged gradient norm is DeepSpeed's global norm, not a clip over empty `p.grad`s."""

import pytest

from qed_lightning.modules import RubricRLModule
from qed_lightning.parallel import DeepSpeedStrategy
from qed_lightning.rewards import RubricJudge
from qed_lightning.rollout import HFEngine

from fakes import NoClient


class _Engine:  # deepspeed.DeepSpeedEngine's part that the module uses
    def __init__(self, norm: float) -> None:
        self.norm = norm

    def get_global_grad_norm(self) -> float:
        return self.norm


class _DeepSpeed(DeepSpeedStrategy):  # recognised by isinstance, as a user's subclass would be; no DeepSpeed here
    def __init__(self, norm: float) -> None:  # skips Lightning's, which needs deepspeed installed
        self.config = {"zero_optimization": {"stage": 3}}
        self._engine = _Engine(norm)

    @property
    def deepspeed_engine(self) -> _Engine:
        return self._engine


class _Trainer:
    def __init__(self, strategy) -> None:
        self.strategy = strategy
        self.datamodule = None
        self.global_step = 0


class _Optimizer:
    steps = 0

    def step(self) -> None:
        self.steps += 1


def _module(norm: float, **kwargs) -> RubricRLModule:
    module = RubricRLModule("unused", engine=HFEngine(), judge=RubricJudge(NoClient()), grad_clip=0.3, **kwargs)
    module._trainer = _Trainer(_DeepSpeed(norm))
    module.lr_schedulers = lambda: None
    return module


def test_grad_clip_goes_to_deepspeed_and_its_norm_is_logged():
    module = _module(norm=2.5)
    module.setup("fit")
    assert module._trainer.strategy.config["gradient_clipping"] == 0.3
    opt = _Optimizer()
    assert module.policy_update.clip_and_step(opt, loss=1.0) == 2.5  # no p.grad anywhere: the norm comes from DeepSpeed
    assert opt.steps == 1


def test_non_finite_steps_under_deepspeed_abort_after_the_limit():
    module = _module(norm=float("nan"), max_nonfinite_steps=2)
    opt = _Optimizer()
    # counted (DeepSpeed has applied it: it cannot be skipped from outside)
    module.policy_update.clip_and_step(opt, loss=1.0)
    with pytest.raises(FloatingPointError, match="2 consecutive non-finite steps"):
        module.policy_update.clip_and_step(opt, loss=1.0)
