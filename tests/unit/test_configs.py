"""Every YAML we ship parses and validates through the real CLI (`--print_config` exits before any work)."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from qed_lightning.cli import make_cli
from qed_lightning.optim import WarmupCosineLR

REPO = Path(__file__).resolve().parents[2]
# configs/strategy, configs/layout and configs/logger hold fragments composed after a stage config
# (tests/unit/test_strategy_presets.py, tests/unit/test_logger_configs.py)
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not {"strategy", "layout", "eval", "logger"} & set(p.parts))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_parses_and_resolves(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_cli(args=["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "${" not in str(printed)  # omegaconf interpolations were resolved
    assert printed["model"]["class_path"].startswith("qed_lightning.modules.")
    # the data's tokenizer is linked to the model (a derived value, so it is not printed)
    assert "tokenizer" not in printed["data"]["init_args"]


def test_tokenizer_link_reaches_the_data_module(tiny_model_dir):
    cli = make_cli(
        args=["--config", str(REPO / "configs/demo/sft.yaml"), "--model.init_args.model_name_or_path", str(tiny_model_dir)],
        run=False,
    )
    assert cli.datamodule.hparams.tokenizer == str(tiny_model_dir)
    assert cli.model.model is None  # building the module loads no weights


def test_a_typo_in_a_key_is_refused_with_its_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_cli(args=["fit", "--config", str(REPO / "configs/demo/sft.yaml"), "--model.init_args.learning_rat", "1"])
    assert exit_info.value.code != 0
    assert "learning_rat" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "steps"), [([], 40), (["--trainer.max_steps", "100"], 100)])
def test_the_schedule_length_follows_max_steps_from_the_command_line(tiny_model_dir, override, steps):
    """`--trainer.max_steps` must reach the LR schedule: `${trainer.max_steps}` in the YAML was resolved before the
    command line, so a run of 100 steps trained at lr 0 from step 40 on (the demo's YAML value)."""
    cli = make_cli(args=["--config", str(REPO / "configs/demo/sft.yaml"),
                         "--model.init_args.model_name_or_path", str(tiny_model_dir), *override], run=False)
    model = cli.model
    model.trainer = cli.trainer
    model.configure_model()
    scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert cli.trainer.max_steps == steps and scheduler.total_steps == steps
    # warm-up 4 then cosine to 0 at `steps`: at step 60 a 100-step run is still at cos-decay ((100-60)/96 left)
    expected = 0.5 * (1 + math.cos(math.pi * min(1.0, (60 - 4) / (steps - 4))))
    assert scheduler.lr_lambda(60) == pytest.approx(expected)
    assert (scheduler.lr_lambda(60) > 0.2) == (steps == 100)


def test_a_resumed_schedule_that_follows_the_run_keeps_the_new_length():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    saved = WarmupCosineLR(opt, warmup_steps=2).follow_run(40)
    for _ in range(10):
        opt.step()
        saved.step()
    resumed = WarmupCosineLR(opt, warmup_steps=2).follow_run(400)
    resumed.load_state_dict(saved.state_dict())
    assert (resumed.last_epoch, resumed.total_steps) == (10, 400)
    fixed = WarmupCosineLR(opt, warmup_steps=2, total_steps=50).follow_run(400)  # a length set in the config stays
    fixed.load_state_dict(saved.state_dict())
    assert fixed.total_steps == 40  # ... and a fixed schedule resumes exactly as saved


def test_schedule_doctests():
    import doctest

    from qed_lightning import optim

    result = doctest.testmod(optim)
    assert result.attempted > 0 and result.failed == 0
