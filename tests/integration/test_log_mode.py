"""The console of a long job: `qed-fit` of the demo RL with its output in a file (log mode, not a terminal)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from runs import REPO, run_process, subprocess_env

CHATTER = ("Setting accelerator to CPU", "Reset SSM cache type", "Loading safetensors checkpoint shards",
           "Total params")


def _fit(tiny_model_dir: Path, root: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "qed_lightning.cli", *extra, "--config", str(REPO / "configs/demo/rl.yaml"),
           "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2",
           "--model.init_args.model_name_or_path", str(tiny_model_dir),
           "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite")]
    log = root.with_suffix(".log")
    assert run_process(cmd, log, 600, subprocess_env(PYTHONPATH=str(REPO / "src"))) == 0, log.read_text()[-4000:]
    return log.read_text()


def test_log_mode_prints_a_line_per_step_and_no_chatter(tiny_model_dir, tmp_path):
    out = _fit(tiny_model_dir, tmp_path / "quiet")
    steps = re.findall(r"^\[step (\d+)\] reward [\d.]+ ± [\d.]+ · loss \S+ · grad_norm \S+ · len [\d.]+ · "
                       r"trunc [\d.]+ · lr 3\.0e-03 · judge_fail 0 · [\d.]+ s$", out, re.MULTILINE)
    assert steps == ["1", "2"], out[-3000:]
    assert re.search(r"^\[step 2\] validation: val/reward_mean [\d.]+ in [\d.]+ s$", out, re.MULTILINE), out[-3000:]
    assert "v_num" not in out and not re.search(r"Epoch \d", out), out[-3000:]
    for line in CHATTER:
        assert line not in out, line
    assert out.rstrip().splitlines()[-1] == f"run folder: {(tmp_path / 'quiet').resolve()}", out[-1000:]


def test_verbose_shows_the_library_chatter(tiny_model_dir, tmp_path):
    out = _fit(tiny_model_dir, tmp_path / "verbose", "-v")
    assert "Loading safetensors checkpoint shards" in out and "Total params" in out, out[-3000:]
