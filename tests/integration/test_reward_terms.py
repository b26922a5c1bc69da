"""Extra reward terms through `qed-fit` (in-process): plain functions of this module named by dotted path, weighted,
added to the judge's reward and logged as `reward/<name>`; a bad path is one line naming the key. And the `qed-fit`
console script run from a directory holding `my_mod.py` (a module subclass) and `my_terms.py` (a term): both import
from the current directory without PYTHONPATH, as TRL's scripts do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qed_lightning.cli import make_cli
from qed_lightning.data.loading import ConfigError
from runs import read_metrics, series, subprocess_env

REPO = Path(__file__).resolve().parents[2]
CALLS: list[tuple[list, list]] = []


def constant(problems, rollouts):
    """1.0 for every rollout; records what it was handed."""
    CALLS.append((list(problems), list(rollouts)))
    return [1.0] * len(rollouts)


def length(problems, rollouts):
    return [len(r.completion_ids) for r in rollouts]


def _args(tiny_model_dir: Path, root: Path, terms: str) -> list[str]:
    return ["--config", str(REPO / "configs/demo/rl.yaml"), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", "1", "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0",
            "--model.init_args.model_name_or_path", str(tiny_model_dir),
            "--model.init_args.export_hf", "false",
            "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
            "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"),
            "--model.init_args.reward_terms", terms]


def test_reward_terms_are_added_to_the_judge_reward_and_logged(tiny_model_dir, tmp_path):
    CALLS.clear()
    terms = f"[{{fn: {__name__}.constant, weight: 0.25}}, {{fn: {__name__}.length, weight: -0.001, name: len_pen}}]"
    make_cli(args=_args(tiny_model_dir, tmp_path, terms))
    rows = read_metrics(tmp_path)
    (problems, rollouts), = CALLS  # one step of 4 prompts x G=4, one call
    assert len(problems) == len(rollouts) == 16
    assert [p.index for p in problems[:4]] == [problems[0].index] * 4  # problems[i] is rollouts[i]'s problem
    assert series(rows, "reward/constant") == [1.0]
    lengths = [len(r.completion_ids) for r in rollouts]
    assert series(rows, "reward/len_pen") == [pytest.approx(sum(lengths) / 16)]
    records = [json.loads(line) for line in (tmp_path / "rollouts" / "step_000000.jsonl").read_text().splitlines()]
    assert len(records) == 16
    for record in records:  # judge reward (score / 7) + 0.25 * 1.0 - 0.001 * length
        expected = record["score"] / 7 + 0.25 - 0.001 * record["completion_tokens"]
        assert record["reward"] == pytest.approx(expected, abs=1e-6)
    assert series(rows, "rollout/reward_mean")[0] == pytest.approx(sum(r["reward"] for r in records) / 16, abs=1e-5)


def test_a_bad_term_path_is_one_line_naming_the_key(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.reward_terms\[0\]\.fn: cannot import module 'no_such_mod'"):
        make_cli(args=_args(tiny_model_dir, tmp_path, "[{fn: no_such_mod.term}]"))
    with pytest.raises(ConfigError, match=r"model\.reward_terms\[0\]\.fn: module '.*' has no 'nope'"):
        make_cli(args=_args(tiny_model_dir, tmp_path / "b", f"[{{fn: {__name__}.nope}}]"))


def test_class_path_and_term_paths_import_from_the_current_directory(tiny_model_dir, tmp_path):
    """Cheap: the run stops at the module's construction, on a second term whose module imported but has no such
    function; reaching that error needs `my_mod.MyRL` resolved and built and `my_terms.bonus` imported, all from the
    current directory (the error would name `my_terms` as not importable otherwise)."""
    (tmp_path / "my_mod.py").write_text(
        "from qed_lightning.modules import RubricRLModule\n\n\n"
        "class MyRL(RubricRLModule):\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        print('MyRL built from', __file__, flush=True)\n"
        "        super().__init__(*args, **kwargs)\n")
    (tmp_path / "my_terms.py").write_text("def bonus(problems, rollouts):\n    return [1.0] * len(rollouts)\n")
    root = tmp_path / "run"
    args = _args(tiny_model_dir, root, "[{fn: my_terms.bonus}, {fn: my_terms.nope}]")
    env = subprocess_env(PYTHONPATH=str(REPO / "src"))  # the package only: the cwd is not on it
    proc = subprocess.run([str(Path(sys.executable).parent / "qed-fit"), "fit", *args, "--model.class_path",
                           "my_mod.MyRL"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"MyRL built from {tmp_path / 'my_mod.py'}" in proc.stdout
    assert "model.reward_terms[1].fn: module 'my_terms' has no 'nope'" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
