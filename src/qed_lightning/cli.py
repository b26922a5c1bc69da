"""`qed-fit`: LightningCLI for every stage, with `fit` as the default subcommand.

    qed-fit --config configs/demo/sft.yaml            # same as: qed-fit fit --config ...
    qed-fit --config configs/rl.yaml --print_config   # validate a paper-scale config without running it
    qed-fit -v --config ...                           # every library's log lines too (or QED_LOG_LEVEL=INFO)

Configs use omegaconf mode, so `${...}` interpolation works. The model's `model_name_or_path` is linked to the data
module's `tokenizer`, so the checkpoint is named once. A data or config error (a bad row, a missing file or model
folder, a used run folder) is printed on one line without a traceback and exits with status 2; `--debug` (or
QED_DEBUG=1) shows the traceback.

Run folders (`qed_lightning.runfolder`): `fit` refuses a folder that already holds a run unless it resumes it
(`--ckpt_path last`), and holds a lock there while it trains. `validate`/`test` log to `<root>/<subcommand>/`, so
their metrics never mix with the training curves that `qed-report` draws from `<root>/csv/`.

Typos: a `--model.K` / `--data.K` that the component's class does not take is refused before the frameworks load
(`config_hints.early_key_check`, when run as the `qed-fit` console script: 0.1-0.2 s instead of 7-10 s); anything
it cannot read for sure goes to the parser, whose error `parse_arguments` turns into the same one line.

Refused values: a component's `__init__` refuses a value with a `ValueError` naming the key; jsonargparse wraps it in
a many-line "Does not validate against any of the Union subtypes" error (with the whole component config). The CLI
takes the refusal that started it (the root of the exception chain) and raises it as one `ConfigError` line.

SIGTERM (a scheduler's pre-emption, `kill`): without a handler, Lightning stops quietly and the process exits 0 with
its progress lost. When the config has no `PreemptionCheckpoint`, the CLI adds one for SIGTERM only, without SLURM
requeue (`requeue=False`: the job script did not ask for it; Lightning's own SIGUSR1 handling is left alone): it logs
the signal, saves `last.ckpt` at the step boundary (in the configured `ModelCheckpoint`'s folder, else in
`<default_root_dir>/checkpoints`) and stops.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

if Path(sys.argv[0]).name == "qed-fit":  # the console script: a key typo is refused before Lightning loads (~7 s)
    from qed_lightning.config_hints import early_key_check

    early_key_check(sys.argv[1:], "qed-fit")

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from qed_lightning.callbacks.hparams import LogConfigCallback
from qed_lightning.data.loading import ConfigError, DataError, debug_requested, exit_on_data_error
from qed_lightning.logs import is_quiet, pop_verbose, setup_logging
from qed_lightning.modules.base import QEDModule
from qed_lightning.runfolder import RunLock, check_fit_folder, check_resume_checkpoint, is_global_zero_process

# the folders the shipped stage configs export to, and the command that writes each (for a missing-model error)
STAGE_EXPORTS = {
    "runs/sft/hf": "stage 1, `qed-fit --config configs/sft.yaml`",
    "runs/rl/hf": "stage 2, `qed-fit --config configs/rl.yaml`",
    "runs/rc/hf": "stage 3, `qed-fit --config configs/rc.yaml`",
    "runs/demo-sft/hf": "the demo SFT, `qed-fit --config configs/demo/sft.yaml`",
    "runs/demo-rl/hf": "the demo RL, `qed-fit --config configs/demo/rl.yaml`",
}

SUBCOMMANDS = {"fit", "validate", "test", "predict"}

log = logging.getLogger(__name__)


class QEDCLI(LightningCLI):
    """LightningCLI with our conventions: tokenizer linked to the model, CSV metrics under the run's root dir (plus
    any tracker of `configs/logger/`), the config and the judge/prompt versions logged as hyperparameters."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer", apply_on="parse")

    lock: RunLock | None = None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        root = str(trainer.get("default_root_dir") or "runs")
        if self.subcommand is not None:  # a run, not a CLI built for inspection (`run=False`)
            check_model_paths(config)
        if is_quiet() and trainer.get("enable_model_summary") is None:
            trainer["enable_model_summary"] = False  # the parameter table is for -v; `loaded X (N parameters)` stays
        complete_loggers(trainer, root, "csv" if self.subcommand in (None, "fit") else self.subcommand)
        dirpaths = set()
        for callback in trainer.get("callbacks") or []:
            # checkpoints in one fixed folder per run, so `--ckpt_path last` finds them after a restart (the
            # default, <log dir>/checkpoints, moves to a new version folder every time the run is resumed)
            init = callback.get("init_args") if hasattr(callback, "get") else None
            if init is not None and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
                if not init.get("dirpath"):
                    init["dirpath"] = f"{root}/checkpoints"
                dirpaths.add(init["dirpath"])
        add_sigterm_checkpoint(trainer, root)
        if self.subcommand == "fit":
            if is_global_zero_process():  # first the lock: "in use by another run" says more than "holds a run"
                self.lock = RunLock(Path(root))
                self.lock.acquire()
            try:
                for dirpath in sorted(dirpaths) or [f"{root}/checkpoints"]:
                    check_fit_folder(Path(root), config.get("ckpt_path"), Path(dirpath))
                    if config.get("ckpt_path"):
                        check_resume_checkpoint(Path(dirpath), config["ckpt_path"])
            except ConfigError:
                self._release()
                raise
        elif self.subcommand in ("validate", "test") and config.get("ckpt_path") not in (None, "last", "best"):
            check_resume_checkpoint(Path(root) / "checkpoints", config["ckpt_path"])

    def parse_arguments(self, parser, args) -> None:
        """A parse error (a typo in a key) as one `ConfigError` line with a did-you-mean (`config_hints`), instead
        of jsonargparse's usage text and its listing of every Union subtype it tried."""
        from qed_lightning.config_hints import parse_error

        parser.exit_on_error = False
        for sub in getattr(parser, "_subcommands_action", None) and parser._subcommands_action.choices.values() or []:
            sub.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:  # usage-error status 2, as jsonargparse's own exit, without the usage text
            sys.stderr.write(f"qed-fit: error: {parse_error(str(err), parser)}\n")
            raise SystemExit(2) from None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            self._release()
            raise config_error(err) from err
        except BaseException:
            self._release()
            raise

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:
            self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def config_error(err: ValueError) -> ValueError:
    """The refusal at the root of an instantiation error's chain, as one line (a `DataError` is kept as it is)."""
    root: BaseException = err
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, (ConfigError, DataError)):
        return root
    if not isinstance(root, ValueError):
        return err
    return ConfigError("; ".join(line.strip() for line in str(root).splitlines() if line.strip()))


def add_sigterm_checkpoint(trainer: Namespace, root: str) -> None:
    """Add a SIGTERM-only `PreemptionCheckpoint` when the config has none (see the module docstring)."""
    callbacks = trainer.get("callbacks") or []
    names = [str(c.get("class_path", "")) for c in callbacks if hasattr(c, "get")]
    if any(name.endswith("PreemptionCheckpoint") for name in names):
        return
    has_checkpoints = any(name.endswith("ModelCheckpoint") for name in names)
    init = Namespace(dirpath=None if has_checkpoints else f"{root}/checkpoints", signals=["SIGTERM"], requeue=False)
    callbacks.append(Namespace(class_path="qed_lightning.callbacks.PreemptionCheckpoint", init_args=init))
    trainer["callbacks"] = callbacks


def check_model_paths(config: Namespace) -> None:
    """A local model folder that does not exist is one line naming the key (and the stage that writes it), not a
    94-line traceback from the hub client that then tries it as a repo id."""
    init = (config.get("model") or Namespace()).get("init_args") or Namespace()
    for key in ("model_name_or_path", "summarizer_model"):
        value = init.get(key)
        if not value or not looks_local(str(value)) or Path(str(value)).exists():
            continue
        norm = str(value).rstrip("/").removeprefix("./")
        writer = STAGE_EXPORTS.get(norm)
        hint = (f"it is written when {writer} ends" if writer else
                "a run exports to <default_root_dir>/hf when it ends" if norm.endswith("/hf") else "a local folder")
        raise ConfigError(f"model.init_args.{key}: {value} does not exist ({hint}; run that first, or point the key "
                          "at a model folder or a hub id)")


def looks_local(name: str) -> bool:
    """A path rather than a hub id (`org/name`): absolute, relative with ./ ../ ~, or more than one `/`."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name.split("/")[0]).is_dir()


def complete_loggers(trainer: Namespace, root: str, name: str = "csv") -> None:
    """CSV metrics in `<root>/<name>` always (`csv` for `fit`: `qed-report` and the tests read them; the subcommand's
    name for `validate`/`test`), first, so the run's `config.yaml` lands beside them; the trackers of
    `configs/logger/*.yaml` write under `<root>` unless their config says where (`logger+:` entries in a YAML cannot
    interpolate the stage config's `default_root_dir`)."""
    spec = trainer.get("logger")
    if spec is False:
        return
    specs = [] if spec in (None, True) else list(spec) if isinstance(spec, list) else [spec]
    if not any(str(s.get("class_path", "")).endswith("CSVLogger") for s in specs):
        specs.insert(0, Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                  init_args=Namespace(save_dir=root, name=name)))
    for s in specs:
        kind, init = str(s.get("class_path", "")).rsplit(".", 1)[-1], s.get("init_args")
        if init is None:
            continue
        if kind == "TensorBoardLogger" and not init.get("save_dir"):
            init["save_dir"] = root
        elif kind == "WandbLogger" and init.get("save_dir") in (None, "."):
            init["save_dir"] = root
        elif kind == "MLFlowLogger":
            if not init.get("tracking_uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
                init["tracking_uri"] = f"file:{os.path.abspath(root)}/mlruns"
            if str(init.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")).startswith("file:"):
                # MLflow 3 refuses its file store unless asked (it wants a database server); a local run wants files
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    trainer["logger"] = specs if len(specs) > 1 else specs[0]


def _with_default_subcommand(args: list[str]) -> list[str]:
    if args and (args[0] in SUBCOMMANDS or args[0] in {"-h", "--help"}):
        return args
    return ["fit", *args]


def make_cli(args: list[str] | None = None, run: bool = True) -> QEDCLI:
    """Build the CLI (tests call this with `args=` to run the real entry point in-process)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the data modules load lazily (qed_lightning.data); imported here, they are subclasses jsonargparse knows by
    # their short name (`--data.help SFTDataModule`, `class_path: ProofRLDataModule`)
    import qed_lightning.data.rl  # noqa: F401
    import qed_lightning.data.sft  # noqa: F401

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
        save_config_callback=LogConfigCallback,  # also logs the config and judge/prompt versions to every logger
        save_config_kwargs={"overwrite": True},
        args=argv,
        run=run,
        auto_configure_optimizers=False,
    )


def main() -> None:
    """The `qed-fit` console script; `-v`/`--verbose` (or `QED_LOG_LEVEL`) shows every library's log lines, `--debug`
    (or QED_DEBUG=1) the traceback of a data error."""
    args, verbose = pop_verbose(sys.argv[1:])
    setup_logging(verbose)
    debug = debug_requested(args)
    sys.argv = sys.argv[:1] + _with_default_subcommand(args)
    import_from_cwd()
    with exit_on_data_error("qed-fit", debug):
        cli = make_cli()
    trainer = getattr(cli, "trainer", None)
    if trainer is not None and cli.subcommand is not None and trainer.is_global_zero:
        sys.stdout.flush()  # the progress bar's last frame (stdout) before the last line
        log.info("run folder: %s", Path(trainer.default_root_dir).resolve())


def import_from_cwd() -> None:
    """The current directory on `sys.path`, so `--model.class_path my_mod.MyModule` and reward-term paths
    (`my_terms.length_penalty`) import a file of the directory the command runs in without PYTHONPATH, as
    TRL's scripts do (a console script's sys.path holds its own bin folder, not the working directory)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


if __name__ == "__main__":
    main()
