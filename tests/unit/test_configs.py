"""Every YAML we ship parses and validates through the real CLI (`--print_config` exits before any work)."""

from pathlib import Path


import pytest
import yaml

from qed_lightning.cli import make_cli

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
