"""One run per folder (`qed_lightning.runfolder`) and the CLI's door checks: which folders `fit` refuses, the lock's
staleness rules, what counts as a local model path, and the job-wide prompt count's split over processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from qed_lightning.cli import looks_local
from qed_lightning.data import ProofRLDataModule
from qed_lightning.data.loading import ConfigError
from qed_lightning.runfolder import LOCK_FILE, STALE_S, RunLock, check_fit_folder


def _ckpt(folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"x")


def test_a_fresh_fit_in_a_folder_with_a_checkpoint_is_refused_with_both_ways_out(tmp_path):
    check_fit_folder(tmp_path, None)  # nothing there yet: fine
    check_fit_folder(tmp_path, "last")  # `--ckpt_path last` before the first checkpoint: a fresh start (SLURM scripts)
    _ckpt(tmp_path / "checkpoints", "last.ckpt")
    with pytest.raises(ConfigError, match=r"already holds a run .*--ckpt_path last.*--trainer.default_root_dir .*-2"):
        check_fit_folder(tmp_path, None)
    check_fit_folder(tmp_path, "last")  # resuming it is what the message offers


def test_ckpt_path_last_without_a_last_checkpoint_is_refused_naming_the_folder(tmp_path):
    _ckpt(tmp_path / "checkpoints", "step=10.ckpt")
    with pytest.raises(ConfigError,
                       match=r"checkpoints holds 1 checkpoint\(s\) but no last.ckpt.*--ckpt_path .*step=10"):
        check_fit_folder(tmp_path, "last")
    check_fit_folder(tmp_path, str(tmp_path / "checkpoints" / "step=10.ckpt"))  # an explicit path is fine


def test_the_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    # a holder on this host whose process is gone (a SIGKILLed run) is stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    second = RunLock(tmp_path)
    second.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    second.release()


def test_a_lock_from_another_host_is_stale_only_once_its_heartbeat_stops(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-17", "pid": 1, "started": "then"}))
    with pytest.raises(ConfigError, match=r"pid 1 on node-17"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_S - 10
    os.utime(tmp_path / LOCK_FILE, (old, old))
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


@pytest.mark.parametrize("name, local", [("runs/sft/hf", True), ("./model", True), ("/abs/model", True),
                                         ("~/m", True), ("Qwen/Qwen3-4B-Thinking-2507", False),
                                         ("lm-provers/FineProofs-SFT", False)])
def test_what_counts_as_a_local_model_path(name, local):
    assert looks_local(name) is local


def test_the_job_wide_prompt_count_splits_over_processes_or_is_refused_with_the_numbers():
    data = ProofRLDataModule("unused.jsonl", prompts_per_step=6, spare_prompts_per_step=2)
    data.trainer = SimpleNamespace(world_size=2)
    assert data.per_process() == (3, 1)
    data.trainer = SimpleNamespace(world_size=4)
    with pytest.raises(ConfigError, match=r"data.prompts_per_step=6 is for the whole job .* 4 training processes: use "
                                          r"a multiple of 4 \(e.g. 4\)"):
        data.per_process()


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-17", "pid": 1, "started": "then", "job": "4242"}))
    monkeypatch.setenv("SLURM_JOB_ID", "999")  # another job: the lock is live
    with pytest.raises(ConfigError, match=r"pid 1 on node-17"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued onto this node
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["job"] == "4242"
    lock.release()


def test_an_unreadable_checkpoint_is_named_with_its_size_and_the_newest_readable_one(tmp_path):
    import torch

    from qed_lightning.runfolder import check_resume_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"global_step": 40, "state_dict": {}}, folder / "step=40.ckpt")
    torch.save({"global_step": 45, "state_dict": {}}, folder / "step=45.ckpt")
    (folder / "last.ckpt").write_bytes(b"")  # a copy that failed, a full disk: 0 bytes
    with pytest.raises(ConfigError, match=r"last.ckpt \(0 bytes\) cannot be read .*newest readable checkpoint is "
                                          r".*step=45.ckpt \(step 45\): resume from it with "
                                          r"--ckpt_path .*step=45.ckpt"):
        check_resume_checkpoint(folder, "last")
    torch.save({"global_step": 50}, folder / "last.ckpt")
    check_resume_checkpoint(folder, "last")  # readable: nothing to say
    (folder / "torn.ckpt").write_bytes(open(folder / "step=40.ckpt", "rb").read()[:100])
    with pytest.raises(ConfigError, match=r"torn.ckpt \(100 bytes\) cannot be read"):
        check_resume_checkpoint(folder, str(folder / "torn.ckpt"))


def test_a_file_where_the_run_writes_a_folder_is_refused_at_the_door(tmp_path):
    (tmp_path / "rollouts").write_text("oops")
    with pytest.raises(ConfigError, match=r"rollouts is a file where the run writes its rollouts/ folder"):
        check_fit_folder(tmp_path, None)


@pytest.mark.parametrize("env, zero", [
    ({}, True),
    ({"LOCAL_RANK": "1"}, False),  # Lightning's launcher, rank 1
    ({"RANK": "0", "LOCAL_RANK": "1"}, False),  # ... with a RANK=0 left over in the parent's environment
    ({"RANK": "8", "LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # torchrun, second node
    ({"RANK": "0", "LOCAL_RANK": "0"}, True),
    ({"SLURM_PROCID": "3"}, False),
    ({"SLURM_PROCID": "0"}, True),
])
def test_which_process_takes_the_run_lock(env, zero, monkeypatch):
    from qed_lightning.runfolder import is_global_zero_process

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_global_zero_process() is zero
