"""`qed-fit`: LightningCLI for every stage, with `fit` as the default subcommand.

    qed-fit --config configs/demo/sft.yaml            # same as: qed-fit fit --config ...
    qed-fit --config configs/rl.yaml --print_config   # validate a paper-scale config without running it
    qed-fit -v --config ...                           # every library's log lines too (or QED_LOG_LEVEL=INFO)

Configs use omegaconf mode, so `${...}` interpolation works. The model's `model_name_or_path` is linked to the data
module's `tokenizer`, so the checkpoint is named once.
"""

from __future__ import annotations

import os
import sys

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from qed_lightning.logs import pop_verbose, setup_logging
from qed_lightning.modules.base import QEDModule

SUBCOMMANDS = {"fit", "validate", "test", "predict"}


class QEDCLI(LightningCLI):
    """LightningCLI with our conventions: tokenizer linked to the model, CSV metrics under the run's root dir."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer", apply_on="parse")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        root = str(trainer.get("default_root_dir") or "runs")
        if trainer.get("logger") in (None, True):  # no logger configured: CSV metrics in <default_root_dir>/csv
            trainer["logger"] = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                          init_args=Namespace(save_dir=root, name="csv"))
        for callback in trainer.get("callbacks") or []:
            # checkpoints in one fixed folder per run, so `--ckpt_path last` finds them after a restart (the
            # default, <log dir>/checkpoints, moves to a new version folder every time the run is resumed)
            init = callback.get("init_args") if hasattr(callback, "get") else None
            if init is not None and str(callback.get("class_path", "")).endswith("ModelCheckpoint") and not init.get("dirpath"):
                init["dirpath"] = f"{root}/checkpoints"


def _with_default_subcommand(args: list[str]) -> list[str]:
    if args and (args[0] in SUBCOMMANDS or args[0] in {"-h", "--help"}):
        return args
    return ["fit", *args]


def make_cli(args: list[str] | None = None, run: bool = True) -> QEDCLI:
    """Build the CLI (tests call this with `args=` to run the real entry point in-process)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = None  # None: LightningCLI reads sys.argv (the console script), which `main` has completed with "fit"
    if args is not None:
        argv = _with_default_subcommand(list(args))
        if not run and argv and argv[0] in SUBCOMMANDS:
            argv = argv[1:]
    return QEDCLI(
        QEDModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=argv,
        run=run,
        auto_configure_optimizers=False,
    )


def main() -> None:
    """The `qed-fit` console script; `-v`/`--verbose` (or `QED_LOG_LEVEL`) shows every library's log lines."""
    args, verbose = pop_verbose(sys.argv[1:])
    setup_logging(verbose)
    sys.argv = sys.argv[:1] + _with_default_subcommand(args)
    make_cli()


if __name__ == "__main__":
    main()
