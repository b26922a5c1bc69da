"""A run folder through `qed-fit` as a user meets it, on one demo SFT run: a second start while it trains is refused
(the lock names the holder), a SIGKILL leaves a stale lock that the next start takes over, a fresh start into the
used folder is refused with the two ways out, `--ckpt_path last` resumes at the checkpoint's step and finishes, and
`--ckpt_path last` with checkpoints but no `last.ckpt` is refused naming the folder, and an unreadable `last.ckpt`
naming its size and the readable checkpoint beside it. And the one-line error for a
stage's missing model folder, typed as a user types the paper config."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs import REPO, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _command(tiny: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qed_lightning.cli", "--config", str(REPO / "configs/demo/sft.yaml"),
            "--trainer.default_root_dir", str(root), "--model.init_args.model_name_or_path", str(tiny),
            "--data.init_args.path", str(REPO / "data/samples/fineproofs_sft.jsonl"), *extra]


def _refused(cmd: list[str], cwd: Path = REPO) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=cwd, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr


def _steps(metrics: Path) -> list[int]:
    with open(metrics) as fh:
        return [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")]


def test_a_run_folder_is_locked_refused_when_used_and_resumed_at_its_step(tiny_model_dir, tmp_path):
    root = tmp_path / "sft"
    with open(tmp_path / "first.log", "w") as fh:
        first = subprocess.Popen(_command(tiny_model_dir, root, "--trainer.max_steps", "400"), stdout=fh,
                                 stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not (root / "checkpoints" / "last.ckpt").exists():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        err = _refused(_command(tiny_model_dir, root))  # while the first run trains
        assert f"{root} is in use by another run (pid {first.pid} on" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (root / ".qed-run.lock").exists()  # a killed run cannot clean up

    err = _refused(_command(tiny_model_dir, root))  # the stale lock is taken over; the checkpoint still refuses
    assert f"{root} already holds a run" in err and "--ckpt_path last" in err and f"{root}-2" in err

    step = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert step >= 10 and step % 10 == 0  # the demo config's every_n_train_steps
    resumed = subprocess.run(_command(tiny_model_dir, root, "--trainer.max_steps", str(step + 5),
                                      "--ckpt_path", "last"),
                             capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    versions = sorted((root / "csv").glob("version_*"))
    assert len(versions) == 2  # one run, resumed: the report reads both versions as one run
    assert _steps(versions[1] / "metrics.csv") == list(range(step, step + 5))  # continues at its step
    assert not (root / ".qed-run.lock").exists()
    # the run ended: its last.ckpt is its final step (not the last multiple of every_n_train_steps)
    last = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == step + 5
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1.ckpt

    (root / "checkpoints" / "last.ckpt").rename(root / "checkpoints" / "step=15.ckpt")
    err = _refused(_command(tiny_model_dir, root, "--ckpt_path", "last"))
    assert f"{root / 'checkpoints'} holds 1 checkpoint(s) but no last.ckpt" in err
    (root / "checkpoints" / "last.ckpt").write_bytes(b"")  # a torn copy: named, with the readable one beside it
    err = _refused(_command(tiny_model_dir, root, "--ckpt_path", "last"))
    assert "last.ckpt (0 bytes) cannot be read" in err and f"step=15.ckpt (step {step + 5})" in err


def test_a_stage_whose_model_folder_is_missing_says_so_in_one_line(tmp_path):
    """`qed-fit --config configs/rl.yaml` before stage 1 has run, typed in a fresh working folder."""
    err = _refused([str(Path(sys.executable).parent / "qed-fit"), "--config", str(REPO / "configs/rl.yaml")],
                   cwd=tmp_path)
    assert "model.init_args.model_name_or_path: runs/sft/hf does not exist (it is written when stage 1, " \
           "`qed-fit --config configs/sft.yaml` ends" in err
    assert len(err.strip().splitlines()) == 1  # the error, with the --debug hint on its line


@pytest.mark.parametrize("cmd, expected", [
    (["qed-export", "no/such.ckpt", "out"], "qed-export: error: "),
    (["qed-eval", "--config", str(REPO / "configs/eval/demo.yaml"), "--n", "0"], "qed-eval: error: "),
    (["qed-fit", "--config", str(REPO / "configs/demo/rl.yaml"), "--trainer.max_stepz", "3"], "did you mean"),
    (["qed-fit", "--config", str(REPO / "configs/demo/rl.yaml"), "--model.init_args.gruop_size", "3"],
     "did you mean group_size?"),
], ids=["export-missing-checkpoint", "eval-settings-guard", "fit-typo-top-level", "fit-typo-in-a-component"])
def test_the_other_commands_refuse_in_one_line(cmd, expected, tmp_path):
    err = _refused([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], cwd=tmp_path)
    lines = err.strip().splitlines()
    assert expected in lines[-1] and sum("error" in line for line in lines) == 1, err  # the error is its own one line


def test_a_key_typo_is_refused_before_the_frameworks_load(tmp_path):
    """The console script's fast path (`config_hints.early_key_check`): the same one line as the parser's, with no
    torch, Lightning or transformers imported (Python's import log says what loaded); measured 0.1-0.2 s against
    7-10 s through the parser on 2 loaded cores."""
    cmd = [str(Path(sys.executable).parent / "qed-fit"), "fit", "--config", str(REPO / "configs/demo/rl.yaml"),
           "--model.grop_size", "4"]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(PYTHONPROFILEIMPORTTIME="1"),
                          cwd=tmp_path, timeout=300)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert [line for line in lines if not line.startswith("import time:")] == [
        "qed-fit: error: model.init_args.grop_size: qed_lightning.modules.RubricRLModule takes no argument "
        "'grop_size' (did you mean group_size?); `--model.help RubricRLModule` lists them"]
    loaded = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    assert "qed_lightning.config_hints" in loaded  # the log is there, and the check ran
    assert not {"torch", "lightning", "transformers", "jsonargparse"} & loaded, sorted(loaded)
    assert seconds < 5, seconds  # the parser's path takes longer than this to import Lightning alone
