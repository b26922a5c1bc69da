"""`qed-report RUN_DIR [RUN_DIR...]`: one self-contained HTML page of training runs and evaluations.

    qed-report runs/demo-sft runs/demo-rl                 # -> runs/report.html (the runs' common folder)
    qed-report runs/rl runs/eval/imo --out report.html    # qed-fit runs and qed-eval output folders, mixed
    qed-report runs/rl --rollouts_per_step 0              # every rollout record (default: 64 per step)
    qed-report runs/rl --max_mb 200 --max_chars 0         # a bigger page, texts whole

A run is a `qed-fit` run folder (its `trainer.default_root_dir`) or a `qed-eval` `output_dir`. The page needs no
server and no network: open it with any browser (`file://...`) or send the one file.

The page is bounded whatever the run (`qed_lightning.report.bound`): whole GRPO groups up to `--rollouts_per_step`
records a step, each long text cut to `--max_chars` with a pointer to its record's file and line, and groups dropped
(every step in turn) until the page fits in `--max_mb`. Whatever is cut is said on the page and in the log.
Default 40 MB: Chromium opens such a page in a few seconds (its JSON parses in well under one), 13 times under the
~512 MiB string limit of its JavaScript engine that a paper-scale run passed (a blank page); 8,000 characters a
text show a proof whole and a long thinking's start and end.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from qed_lightning.logs import setup_logging
from qed_lightning.report.bound import fit_groups
from qed_lightning.report.html import fixed_size, write_report
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
                 rollouts_per_step: int = 64, max_chars: int = 8000, max_mb: float = 40.0) -> Path:
    """Load every run (all problems reported together), bound the page (module docstring) and write it; returns its
    path. What was cut is logged as a warning and shown on the page."""
    if max_mb <= 0 or max_chars < 0 or rollouts_per_step < 0:
        raise ValueError(f"--max_mb must be > 0 (got {max_mb}), --max_chars and --rollouts_per_step >= 0 "
                         f"(got {max_chars}, {rollouts_per_step}; 0 = no bound)")
    folders = [Path(p) for p in paths]
    runs, problems = [], []
    for folder, name in zip(folders, _names(folders), strict=True):
        try:
            runs.append(load_run(folder, name, per_step=rollouts_per_step or None, max_chars=max_chars or None))
        except RunNotFound as err:
            problems.append(str(err))
    if problems:
        raise RunNotFound("\n".join(problems))
    title = title or "qed-lightning report: " + ", ".join(r["name"] for r in runs)
    warnings = _fit(runs, title, max_chars, int(max_mb * 1e6))
    for warning in warnings:
        log.warning("qed-report: %s", warning)
    path = write_report(runs, out or default_out(folders), title, warnings)
    rollouts = sum(len(r["rollouts"]) for r in runs)
    log.info("report of %d run(s), %d rollout record(s), %.1f MB: %s", len(runs), rollouts,
             path.stat().st_size / 1e6, path)
    return path


def _fit(runs: list[dict], title: str, max_chars: int, max_bytes: int) -> list[str]:
    """Drop groups until the page fits in `max_bytes`; the warnings that say what the page leaves out."""
    warnings = []
    cut = sum(r["bounds"]["texts_cut"] for r in runs)
    if cut:
        warnings.append(f"{cut:,} long texts are cut to {max_chars:,} characters (head and tail kept); each names the "
                        "file and line of its whole record (--max_chars 0 keeps them whole)")
    fixed = fixed_size(runs, title) + 4096  # the code, curves and configs, and room for the warnings themselves
    if fixed > max_bytes:
        warnings.append(f"the page without any rollout is {fixed / 1e6:.1f} MB, over --max_mb {max_bytes / 1e6:g}: no "
                        "rollout is shown")
    kept = sum(len(r["rollouts"]) for r in runs)
    dropped = fit_groups(runs, max(max_bytes - fixed, 0))
    if dropped:
        warnings.append(f"{dropped:,} of {kept:,} rollout records (whole groups, every step in turn) are left out "
                        f"to keep the page under --max_mb {max_bytes / 1e6:g}; raise it, or lower --max_chars")
    return warnings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qed-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="qed-fit run folders and/or qed-eval output folders")
    parser.add_argument("--out", "-o", default=None, help="the HTML file to write (default: see above)")
    parser.add_argument("--title", default=None, help="the page title (default: the run names)")
    parser.add_argument("--rollouts_per_step", type=int, default=64,
                        help="rollout records kept per step and run: whole GRPO groups, spread evenly (0 = all)")
    parser.add_argument("--max_chars", type=int, default=8000,
                        help="each long text (completion, proof, judge reply, prompt, rubric) cut to this many "
                             "characters, with a pointer to its record (0 = whole)")
    parser.add_argument("--max_mb", type=float, default=40.0,
                        help="the page's size bound in MB: whole groups are left out beyond it (default 40: see above)")
    parser.add_argument("-v", "--verbose", action="store_true", help="every library's log lines")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        path = build_report(args.runs, args.out, args.title, args.rollouts_per_step, args.max_chars, args.max_mb)
    except (RunNotFound, ValueError) as err:
        parser.exit(2, f"qed-report: {err}\n")
    sys.stdout.write(f"{path}\n")  # the command's result: the page to open (file://{absolute path})


if __name__ == "__main__":
    main()
