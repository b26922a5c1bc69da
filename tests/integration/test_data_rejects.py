"""A FineProofs-RL-shaped file with valid rows and one row per defect, through `qed-fit`: `error` names every bad row
in one message, `skip` trains on the valid rows and writes every reject, and the console scripts print a data error
without a traceback and exit with status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qed_lightning.cli import make_cli
from runs import read_metrics, series

REPO = Path(__file__).resolve().parents[2]
RL_ROWS = [json.loads(line) for line in (REPO / "data/samples/fineproofs_rl.jsonl").read_text().splitlines()
           if line.strip()]
NINE = RL_ROWS[1]["rubrics"].replace("**4 pts**", "**6 pts**", 1)  # 2 + 6 + 1 = 9

# line -> (column, reason) of each defect; the other lines hold valid rows (line 16 has an unknown extra column)
DEFECTS = {
    2: ("problem", "missing column 'problem'"),
    4: ("problem", "empty string"),
    6: ("rubrics", "expected a markdown string or a list of {title, points, description} items, got int"),
    8: ("rubrics", "rubric checkpoints total 9 points, expected 7 (chains count by their maximum)"),
    10: ("scores", "score 8 (item 1) is not an integer 0..7"),
    12: (None, "expected a JSON object per line, got an array"),
    14: ("problem", "lone surrogate \\ud800 at character 15: not valid Unicode text"),
}


def _mixed_file(path: Path) -> Path:
    valid = iter(dict(r) for r in RL_ROWS)
    lines = []
    for line in range(1, 17):
        row = next(valid)
        if line == 2:
            del row["problem"]
        elif line == 4:
            row["problem"] = "   "
        elif line == 6:
            row["rubrics"] = 5
        elif line == 8:
            row["rubrics"] = NINE
        elif line == 10:
            row["scores"] = [7, 8]
        elif line == 12:
            lines.append(json.dumps([row["problem"], row["rubrics"]]))
            continue
        elif line == 14:
            lines.append('{"problem": "x\\ud800 y", "rubrics": ' + json.dumps(row["rubrics"]) + ', "scores": [1]}')
            continue
        elif line == 16:
            row["my_notes"] = {"anything": [1, 2]}
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _args(tiny: Path, root: Path, data: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/demo/rl.yaml"), "--trainer.default_root_dir", str(root),
            "--model.init_args.model_name_or_path", str(tiny), "--model.init_args.export_hf", "false",
            "--model.init_args.judge.init_args.cache_path", str(root / "g.sqlite"),
            "--data.init_args.path", str(data), "--data.init_args.reward_mean_range", "[0.0, 1.0]", *extra]


def test_error_names_every_bad_row_by_line_and_column_in_one_message(tiny_model_dir, tmp_path):
    data = _mixed_file(tmp_path / "mixed.jsonl")
    with pytest.raises(ValueError) as info:
        make_cli(args=_args(tiny_model_dir, tmp_path / "run", data))
    message = str(info.value)
    assert message.startswith(f"{data}: 7 of 16 rows are invalid (lines of the file):")
    for line, (column, reason) in DEFECTS.items():
        where = f"line {line}, column {column!r}" if column else f"line {line}"
        assert f"{where}: {reason}" in message, (line, message)
    assert "my_notes" not in message and "line 16" not in message  # an unknown column is ignored
    assert "data.on_invalid_row=skip" in message


@pytest.mark.slow
def test_skip_trains_on_the_valid_rows_and_writes_every_reject(tiny_model_dir, tmp_path):
    data, root = _mixed_file(tmp_path / "mixed.jsonl"), tmp_path / "run"
    make_cli(args=_args(tiny_model_dir, root, data, "--data.init_args.on_invalid_row", "skip",
                        "--data.init_args.max_invalid_fraction", "0.5", "--data.init_args.val_size", "0",
                        "--model.init_args.engine", "qed_lightning.rollout.HFEngine", "--trainer.max_steps", "2",
                        "--model.init_args.max_new_tokens", "16"))
    rejects = [json.loads(line) for line in (root / "data_rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["column"], r["reason"][:40]) for r in rejects] == [
        (line, column, reason[:40]) for line, (column, reason) in DEFECTS.items()]
    assert all(r["file"] == str(data) for r in rejects)
    assert rejects[0]["row"] == {k: v for k, v in RL_ROWS[1].items() if k != "problem"}  # the row itself
    report = json.loads((root / "data_report.json").read_text())
    assert (report["rows"], report["rejected"], report["stats"]["data/problems"]) == (16, 7, 9.0)
    rows = read_metrics(root)
    assert series(rows, "data/rejected") == [7.0] and series(rows, "data/rows_read") == [16.0]
    assert len(series(rows, "train/loss")) == 2  # 9 valid problems, 4 per step: it trained


def _console(module: str, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "QED_DEBUG": "1" if debug else "0"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


def test_console_scripts_print_a_data_error_without_a_traceback_and_exit_2(tiny_model_dir, tmp_path):
    data = _mixed_file(tmp_path / "mixed.jsonl")
    fit = _console("qed_lightning.cli", *_args(tiny_model_dir, tmp_path / "run", data))
    assert fit.returncode == 2, fit.stderr[-3000:]
    assert "Traceback" not in fit.stderr and "Traceback" not in fit.stdout
    assert f"qed-fit: error: {data}: 7 of 16 rows are invalid" in fit.stderr
    assert "line 14, column 'problem': lone surrogate" in fit.stderr and "QED_DEBUG=1" in fit.stderr

    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"problem": "P", "solution": "S", "grading_guidelines": "G"}\n{"problem": "Q", "solution": 3, '
                     '"grading_guidelines": "G"}\n', encoding="utf-8")
    evaluate = _console("qed_lightning.eval.cli", "--config", str(REPO / "configs/eval/demo.yaml"),
                        "--benchmark.init_args.path", str(bench), "--output_dir", str(tmp_path / "eval"))
    assert evaluate.returncode == 2, evaluate.stderr[-3000:]
    assert "Traceback" not in evaluate.stderr
    assert "qed-eval: error:" in evaluate.stderr
    assert "line 2, column 'solution': expected a string, got int" in evaluate.stderr

    debug = _console("qed_lightning.cli", *_args(tiny_model_dir, tmp_path / "run", data), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr
