"""`qed-report RUN_DIR [RUN_DIR...]`: one self-contained HTML page of training runs and evaluations.

    qed-report runs/demo-sft runs/demo-rl                 # -> runs/report.html (the runs' common folder)
    qed-report runs/rl runs/eval/imo --out report.html    # qed-fit runs and qed-eval output folders, mixed
    qed-report runs/rl --rollouts_per_step 0              # every rollout record (default: 64 per step)

A run is a `qed-fit` run folder (its `trainer.default_root_dir`) or a `qed-eval` `output_dir`. The page needs no
server and no network: open it with any browser (`file://...`) or send the one file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from qed_lightning.logs import setup_logging
from qed_lightning.report.html import write_report
from qed_lightning.report.runs import RunNotFound, load_run

__all__ = ["build_report", "main"]

log = logging.getLogger(__name__)


def _names(paths: list[Path]) -> list[str]:
    """Folder names, made unique with their parent's name where two runs share one (e.g. two `demo` folders)."""
    names = [p.name or str(p) for p in paths]
    return [f"{p.parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def default_out(paths: list[Path]) -> Path:
    """`<run>/report.html` for one run, `<the runs' common folder>/report.html` for several."""
    if len(paths) == 1:
        return paths[0] / "report.html"
    return Path(os.path.commonpath([str(p.resolve()) for p in paths])) / "report.html"


def build_report(paths: list[str | Path], out: str | Path | None = None, title: str | None = None,
                 rollouts_per_step: int = 64) -> Path:
    """Load every run (all problems reported together) and write the page; returns its path."""
    folders = [Path(p) for p in paths]
    runs, problems = [], []
    for folder, name in zip(folders, _names(folders), strict=True):
        try:
            runs.append(load_run(folder, name, per_step=rollouts_per_step or None))
        except RunNotFound as err:
            problems.append(str(err))
    if problems:
        raise RunNotFound("\n".join(problems))
    title = title or "qed-lightning report: " + ", ".join(r["name"] for r in runs)
    path = write_report(runs, out or default_out(folders), title)
    rollouts = sum(len(r["rollouts"]) for r in runs)
    log.info("report of %d run(s), %d rollout record(s): %s", len(runs), rollouts, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qed-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="qed-fit run folders and/or qed-eval output folders")
    parser.add_argument("--out", "-o", default=None, help="the HTML file to write (default: see above)")
    parser.add_argument("--title", default=None, help="the page title (default: the run names)")
    parser.add_argument("--rollouts_per_step", type=int, default=64,
                        help="rollout records kept per step and run, spread evenly (0 = all; the page grows with it)")
    parser.add_argument("-v", "--verbose", action="store_true", help="every library's log lines")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        path = build_report(args.runs, args.out, args.title, args.rollouts_per_step)
    except RunNotFound as err:
        parser.exit(2, f"qed-report: {err}\n")
    sys.stdout.write(f"{path}\n")  # the command's result: the page to open (file://{absolute path})


if __name__ == "__main__":
    main()
