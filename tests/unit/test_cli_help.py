"""`--help` describes every knob: each `__init__` argument of the stage modules, data modules and judges has a
description that jsonargparse reads from its docstring (Google-style `Args:`, one entry per argument), and so has the
strategies' collective timeout."""

from __future__ import annotations

import inspect

import pytest
from jsonargparse import ArgumentParser

from qed_lightning.data.rl import ProofRLDataModule
from qed_lightning.data.sft import SFTDataModule
from qed_lightning.modules.base import QEDModule
from qed_lightning.modules.rc_rl import ReasoningCacheRLModule
from qed_lightning.modules.rubric_rl import RubricRLModule
from qed_lightning.modules.sft import SFTModule
from qed_lightning.rewards import ProofBenchJudge, RubricJudge

CLASSES = [SFTModule, RubricRLModule, ReasoningCacheRLModule, SFTDataModule, ProofRLDataModule, RubricJudge,
           ProofBenchJudge]


def init_arguments(cls: type) -> set[str]:
    """Every argument of `cls.__init__`, and of the bases its `**kwargs` passes to, as far as `QEDModule`."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass.__module__.startswith("lightning"):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if klass is QEDModule:
            break
    return names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_init_argument_has_a_help_text(cls):
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "x", fail_untyped=False, sub_configs=True)
    helps = {a.dest.removeprefix("x."): a.help for a in parser._actions if a.dest.startswith("x.")}
    expected = init_arguments(cls)
    assert expected, cls
    undescribed = sorted(name for name in expected if not helps.get(name) or str(helps[name]).startswith("(type"))
    assert not undescribed, f"{cls.__name__}: no description in --help for {undescribed}"


def test_init_arguments_walks_the_bases():
    # RubricRLModule's `**kwargs` reach QEDModule: its optimizer is a knob of the RL module too
    names = init_arguments(RubricRLModule)
    assert {"group_size", "clip_low", "aggregation", "optimizer", "lr_scheduler", "dtype"} <= names
    assert {"cycles", "group_size"} <= init_arguments(ReasoningCacheRLModule)


@pytest.mark.parametrize("strategy", ["FSDP2Strategy", "DeepSpeedStrategy"])
def test_the_strategies_collective_timeout_has_a_help_text(strategy):
    import qed_lightning.parallel as parallel

    parser = ArgumentParser()
    parser.add_class_arguments(getattr(parallel, strategy), "x", fail_untyped=False, sub_configs=True)
    (timeout,) = [a.help for a in parser._actions if a.dest == "x.timeout"]
    assert "4 h" in str(timeout), timeout
