"""`qed-eval`: evaluate a checkpoint on a proof benchmark, or measure a judge against human grades.

    qed-eval --config configs/eval/imo_proofbench.yaml                  # same as: qed-eval evaluate --config ...
    qed-eval --config configs/eval/demo.yaml --model .cache/tiny --n 2  # any `Evaluator` argument as a flag
    qed-eval --config configs/eval/proofbench.yaml --print_config       # validate a config without running it
    qed-eval agreement --config configs/eval/imo_proofbench.yaml --human_grades data/samples/judge_agreement.jsonl

The schema is `Evaluator.__init__` (jsonargparse): components (benchmark, judge, engine, scaffold) are chosen by
`class_path`; configs use omegaconf mode, so `${...}` interpolation works. Rerunning a command resumes in its
`output_dir`. A data error is printed without a traceback and exits with status 2 (`--debug` or QED_DEBUG=1 shows it).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from qed_lightning.data.loading import debug_requested, exit_on_data_error
from qed_lightning.eval.runner import Evaluator
from qed_lightning.logs import pop_verbose, setup_logging

__all__ = ["build_parser", "main", "make_evaluator", "run"]

log = logging.getLogger(__name__)

SUBCOMMANDS = {"evaluate": "generate, grade and report (the default)",
               "agreement": "grade human-graded samples with the judge and report agreement"}


def _subparser(name: str) -> ArgumentParser:
    parser = ArgumentParser(prog=f"qed-eval {name}", parser_mode="omegaconf", description=SUBCOMMANDS[name])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config (configs/eval/*.yaml)")
    parser.add_class_arguments(Evaluator, fail_untyped=True, sub_configs=True)
    if name == "agreement":
        parser.add_argument("--human_grades", type=str, required=True,
                            help="JSONL/JSON/Parquet with problem_id, response, human_score (0..7)")
        parser.add_argument("--human_columns", type=dict[str, str] | None, default=None,
                            help="map of problem_id/response/human_score onto the file's column names")
    return parser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="qed-eval", parser_mode="omegaconf", description=__doc__.split("\n\n")[0])
    subcommands = parser.add_subcommands(dest="subcommand")
    for name, help_text in SUBCOMMANDS.items():
        subcommands.add_subcommand(name, _subparser(name), help=help_text)
    return parser


def _with_default_subcommand(args: list[str]) -> list[str]:
    if args and (args[0] in SUBCOMMANDS or args[0] in {"-h", "--help"}):
        return args
    return ["evaluate", *args]


def make_evaluator(args: list[str] | None = None) -> tuple[str, Evaluator, dict[str, Any]]:
    """Parse `args` (default: sys.argv) and build the evaluator; returns (subcommand, evaluator, extra options)."""
    parser = build_parser()
    argv = _with_default_subcommand(list(sys.argv[1:] if args is None else args))
    config = parser.parse_args(argv)
    name = config.subcommand
    init = parser.instantiate_classes(config)[name]
    accepted = set(inspect.signature(Evaluator.__init__).parameters) - {"self"}
    evaluator = Evaluator(**{key: value for key, value in init.items() if key in accepted})
    extra = {key: init[key] for key in ("human_grades", "human_columns") if key in init}
    return name, evaluator, extra


def run(args: list[str] | None = None) -> dict[str, Any]:
    """Parse, build, run the subcommand and close; returns its summary (tests call this with `args=`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name, evaluator, extra = make_evaluator(args)
    try:
        if name == "agreement":
            summary = evaluator.agreement(extra["human_grades"], extra.get("human_columns"))
        else:
            summary = evaluator.run()
        log.info("run folder: %s", evaluator.output_dir.resolve())
        return summary
    finally:
        evaluator.close()


def main(args: list[str] | None = None) -> None:
    """The `qed-eval` console script; `-v`/`--verbose` (or `QED_LOG_LEVEL`) shows every library's log lines, `--debug`
    (or QED_DEBUG=1) the traceback of a data error."""
    args, verbose = pop_verbose(list(sys.argv[1:] if args is None else args))
    setup_logging(verbose)
    debug = debug_requested(args)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `class_path: my_mod.MyScaffold` from the current directory, as qed-fit
    with exit_on_data_error("qed-eval", debug):
        run(args)


if __name__ == "__main__":
    main()
