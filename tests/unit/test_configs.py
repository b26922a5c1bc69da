"""Every YAML we ship parses and validates through the real CLI (`--print_config` exits before any work)."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from qed_lightning.cli import make_cli
from qed_lightning.model.optim import WarmupCosineLR

REPO = Path(__file__).resolve().parents[2]
# configs/strategy, configs/layout and configs/logger hold fragments composed after a stage config
# (tests/unit/test_strategy_presets.py, tests/unit/test_logger_configs.py)
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml")
                 if not {"strategy", "layout", "eval", "logger", "rehearsal"} & set(p.parts))


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
        args=["--config", str(REPO / "configs/demo/sft.yaml"),
              "--model.init_args.model_name_or_path", str(tiny_model_dir)],
        run=False,
    )
    assert cli.datamodule.hparams.tokenizer == str(tiny_model_dir)
    assert cli.model.model is None  # building the module loads no weights


def test_a_typo_in_a_key_is_refused_with_its_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_cli(args=["fit", "--config", str(REPO / "configs/demo/sft.yaml"), "--model.init_args.learning_rat", "1"])
    assert exit_info.value.code != 0
    assert "learning_rat" in capsys.readouterr().err


def _printed(capsys, *configs: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        make_cli(args=["fit", *(a for c in configs for a in ("--config", str(REPO / "configs" / c))), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


#: what a rehearsal overlay may change: sizes, devices, precision, the judge's client (and its model's stand-ins)
REHEARSAL_MAY_CHANGE = (
    "trainer.accelerator", "trainer.devices", "trainer.precision", "trainer.max_steps", "trainer.val_check_interval",
    "model.init_args.attn_implementation", "model.init_args.group_size", "model.init_args.max_new_tokens",
    "model.init_args.micro_batch_tokens", "model.init_args.logits_chunk_tokens", "model.init_args.loss_chunk_tokens",
    "model.init_args.cycles", "model.init_args.summarizer_model", "model.init_args.summarizer_max_new_tokens",
    "model.init_args.engine.init_args.dtype", "model.init_args.engine.init_args.max_model_len",
    "model.init_args.engine.init_args.gpu_memory_utilization", "model.init_args.engine.init_args.enforce_eager",
    "model.init_args.engine.init_args.engine.init_args.dtype",
    "model.init_args.engine.init_args.engine.init_args.max_concurrency",
    "model.init_args.judge.init_args.require_think_close", "model.init_args.judge.init_args.client",
    "data.init_args.path", "data.init_args.max_length", "data.init_args.batch_size", "data.init_args.prompts_per_step",
    "data.init_args.val_size", "data.init_args.max_prompt_tokens",
)


@pytest.mark.parametrize("stage, overlays", [
    ("sft.yaml", ["rehearsal/sft.yaml"]),
    ("rl.yaml", ["rehearsal/rl.yaml"]),
    ("rc.yaml", ["rehearsal/rc.yaml"]),
    ("rl.yaml", ["rehearsal/rl.yaml", "layout/one_node_async.yaml", "rehearsal/one_node_async.yaml"]),
    ("rl.yaml", ["rehearsal/rl.yaml", "layout/pipeline_rl.yaml", "rehearsal/pipeline_rl.yaml"]),
], ids=lambda v: v if isinstance(v, str) else "+".join(Path(p).stem for p in v))
def test_a_rehearsal_overlay_changes_only_sizes_devices_precision_and_the_judge_client(stage, overlays, capsys):
    """scripts/rehearse.py runs the paper configs through their own paths: the overlay may shrink them, never
    re-route them (the model a stage starts from, the run folder, the checkpoints, the optimizer stay the config's)."""
    layout = [c for c in overlays if c.startswith("layout/")]
    paper = _flat(_printed(capsys, stage, *layout))
    rehearsed = _flat(_printed(capsys, stage, *overlays))
    changed = {k for k in paper.keys() | rehearsed.keys() if paper.get(k) != rehearsed.get(k)}
    allowed = REHEARSAL_MAY_CHANGE + (("model.init_args.model_name_or_path",) if stage == "sft.yaml" else ())
    assert changed and {k for k in changed if not k.startswith(allowed)} == set()
    assert rehearsed["trainer.default_root_dir"] == paper["trainer.default_root_dir"]
    if stage != "sft.yaml":  # the stage reads the previous stage's export, as the paper config says
        expected = {"rl.yaml": "runs/sft/hf", "rc.yaml": "runs/rl/hf"}[stage]
        assert rehearsed["model.init_args.model_name_or_path"] == expected


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

    from qed_lightning.model import optim

    result = doctest.testmod(optim)
    assert result.attempted > 0 and result.failed == 0
