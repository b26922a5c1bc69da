"""`--help` describes every knob: each `__init__` argument of the stage modules, data modules and judges has a
description that jsonargparse reads from its docstring (Google-style `Args:`, one entry per argument), and so has the
strategies' collective timeout. And `qed-fit`'s fast key check (`config_hints.early_key_check`): the names it reads
from the source are the parser's, so it refuses exactly what the parser would, and lets through what it cannot read
for sure."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from qed_lightning.config_hints import early_key_check, init_argument_names, static_init_names

from qed_lightning.data.rl import ProofRLDataModule
from qed_lightning.data.sft import SFTDataModule
from qed_lightning.modules.base import QEDModule
from qed_lightning.modules.rc_rl import ReasoningCacheRLModule
from qed_lightning.modules.rubric_rl import RubricRLModule
from qed_lightning.modules.sft import SFTModule
from qed_lightning.rewards import ProofBenchJudge, RubricJudge

REPO = Path(__file__).resolve().parents[2]

STAGES = [SFTModule, RubricRLModule, ReasoningCacheRLModule, SFTDataModule, ProofRLDataModule]
CLASSES = [*STAGES, RubricJudge, ProofBenchJudge]


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


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.__name__)
def test_the_fast_key_check_reads_the_parsers_names_from_source(cls):
    package = "qed_lightning.modules" if issubclass(cls, QEDModule) else "qed_lightning.data"
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "x", fail_untyped=False, sub_configs=True)
    accepted = {a.dest.removeprefix("x.").split(".")[0] for a in parser._actions if a.dest.startswith("x.")}
    names = static_init_names(f"{package}.{cls.__name__}")
    assert names == init_argument_names(cls) and names <= accepted and accepted - names <= {"help"}
    assert static_init_names(f"{cls.__module__}.{cls.__name__}") == names  # the defining module's path too


def test_early_key_check_refuses_a_typo_and_leaves_the_rest_to_the_parser(capsys):
    rl, sft = str(REPO / "configs/demo/rl.yaml"), str(REPO / "configs/demo/sft.yaml")
    with pytest.raises(SystemExit) as err:
        early_key_check(["fit", "--config", rl, "--model.grop_size", "4"], "qed-fit")
    assert err.value.code == 2
    assert capsys.readouterr().err == (
        "qed-fit: error: model.init_args.grop_size: qed_lightning.modules.RubricRLModule takes no argument "
        "'grop_size' (did you mean group_size?); `--model.help RubricRLModule` lists them\n")
    with pytest.raises(SystemExit):  # --k=v, init_args spelled out, the data module
        early_key_check(["--config", rl, "--data.init_args.prompts_per_stp=2"], "qed-fit")
    assert "data.init_args.prompts_per_stp: qed_lightning.data.ProofRLDataModule" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the class given later on the command line decides: SFT has no group_size
        early_key_check(["--config", rl, "--model.group_size", "4", "--model.class_path",
                         "qed_lightning.modules.SFTModule"], "qed-fit")
    assert "SFTModule takes no argument 'group_size'" in capsys.readouterr().err
    fine = [
        ["--config", rl, "--model.group_size", "4", "--model.init_args.judge.init_args.cache_path", "x",
         "--data.prompts_per_step", "2", "--trainer.max_stepz", "3", "--model.help", "RubricRLModule"],
        ["--config", sft, "--model.loss_chunk_tokens", "64"],
        ["--config", rl, "--model.class_path", "my_mod.MyRL", "--model.anything", "1"],  # a class it cannot read
        ["--config", rl, "--model", "other.yaml", "--model.anything", "1"],  # a component config: the parser's
        ["--model.anything", "1"],  # no class known
        ["--config", "no/such.yaml", "--model.grop_size", "1"],  # the parser reports the missing file
    ]
    for argv in fine:
        assert early_key_check(argv, "qed-fit") is None, argv
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("strategy", ["FSDP2Strategy", "DeepSpeedStrategy"])
def test_the_strategies_collective_timeout_has_a_help_text(strategy):
    import qed_lightning.parallel as parallel

    parser = ArgumentParser()
    parser.add_class_arguments(getattr(parallel, strategy), "x", fail_untyped=False, sub_configs=True)
    (timeout,) = [a.help for a in parser._actions if a.dest == "x.timeout"]
    assert "4 h" in str(timeout), timeout
