"""SLURM launchers and pre-emption, without a cluster: script syntax, the environment the training script hands to
Lightning, and a real demo job that gets SIGUSR1, checkpoints, "requeues" (a fake `scontrol`) and resumes."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qed_lightning.callbacks.preemption import slurm_job_id

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "scripts" / "slurm").glob("*.sbatch")) + [REPO / "scripts" / "gpu_check.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_are_valid_bash(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _srun_qed_fit_args(script: Path, env: dict[str, str]) -> list[str]:
    """The qed-fit arguments of the script's `srun` line, with the script's variables expanded from `env`."""
    text = script.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("srun ") and "qed-fit" in ln)
    words = shlex.split(line)
    args = words[next(i for i, w in enumerate(words) if w.endswith("qed-fit")) + 1:]
    expanded = []
    for word in args:
        if word == "$@":
            continue
        expanded.append(re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], word))
    return expanded


def _task_env(rank: int, nodes: int, per_node: int) -> dict[str, str]:
    """What srun sets for task `rank` of a `nodes` x `per_node` job (the variables Lightning's SLURMEnvironment
    reads)."""
    return {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "qed-train", "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * per_node), "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node),
        "SLURM_NODELIST": "gpu[017-018]", "SLURM_CPUS_PER_TASK": "2",
    }


PROBE = r"""
import json, sys
from qed_lightning.cli import make_cli
cli = make_cli(args=json.loads(sys.argv[1]), run=False)
t, env = cli.trainer, cli.trainer.strategy.cluster_environment
print("PROBE " + json.dumps({"env": type(env).__name__, "auto_requeue": getattr(env, "auto_requeue", None),
      "external": env.creates_processes_externally, "world": t.world_size, "rank": t.global_rank, "local": t.local_rank,
      "node": t.node_rank, "nodes": t.num_nodes, "devices": t.num_devices, "main_address": env.main_address,
      "callbacks": [type(cb).__name__ for cb in t.callbacks]}))
"""


@pytest.mark.parametrize("rank", [0, 3])
def test_train_sbatch_hands_lightning_the_slurm_world(rank, tiny_model_dir):
    """The script's srun argument list, parsed by qed-fit in a process that sees what srun sets for one task (its
    own process: Lightning writes MASTER_ADDR and the rank into process-wide state)."""
    env = _task_env(rank, nodes=2, per_node=2)
    args = _srun_qed_fit_args(REPO / "scripts/slurm/train.sbatch",
                              {**env, "VENV": ".venv", "CONFIG": str(REPO / "configs/demo/sft.yaml"),
                               "STRATEGY": str(REPO / "configs/strategy/ddp.yaml")})
    assert args[-2:] == ["--ckpt_path", "last"]  # resume from the newest last.ckpt, or start fresh
    assert "--trainer.plugins.auto_requeue=false" in args
    assert "--trainer.callbacks+=qed_lightning.callbacks.PreemptionCheckpoint" in args
    # the CPU accelerator stands in for GPUs; everything else is the script's own argument list
    probe_args = [*args[:-2], "--trainer.accelerator", "cpu",
                  "--model.init_args.model_name_or_path", str(tiny_model_dir)]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(probe_args)], capture_output=True, text=True,
                          env={**os.environ, **env, "HF_HUB_OFFLINE": "1"}, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE "))[6:])
    assert got["env"] == "SLURMEnvironment" and got["auto_requeue"] is False
    assert got["external"]  # srun started the tasks: Lightning launches nothing
    assert (got["world"], got["rank"], got["local"], got["node"]) == (4, rank, rank % 2, rank // 2)
    assert (got["nodes"], got["devices"]) == (2, 2)
    assert got["main_address"] == "gpu017"  # rendezvous on the job's first node
    assert "PreemptionCheckpoint" in got["callbacks"]


def test_slurm_job_id_of_array_jobs():
    assert slurm_job_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3"}) == "7_3"
    assert slurm_job_id({}) is None


def _sft_command(tiny: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qed_lightning.cli", "--config", str(REPO / "configs/demo/sft.yaml"),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "30",
            "--model.init_args.model_name_or_path", str(tiny), "--model.init_args.export_dir", str(root / "hf"),
            "--data.init_args.path", str(REPO / "data/samples/fineproofs_sft.jsonl"),
            "--trainer.callbacks.every_n_train_steps=5",  # the config's AtomicModelCheckpoint (save_last: true)
            "--trainer.callbacks+=qed_lightning.callbacks.PreemptionCheckpoint", *extra]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigusr1_checkpoints_requeues_and_the_requeued_job_resumes(tiny_model_dir, tmp_path):
    root = tmp_path / "run"
    bin_dir = tmp_path / "bin"  # a fake `scontrol` that records its arguments
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "SLURM_JOB_ID": "4242",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    first_log = tmp_path / "first.log"
    with open(first_log, "w") as fh:
        proc = subprocess.Popen(_sft_command(tiny_model_dir, root), stdout=fh, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO)
        deadline = time.monotonic() + 600
        while not (root / "checkpoints" / "last.ckpt").exists():  # training is under way (a periodic save at step 5)
            assert proc.poll() is None, first_log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=USR1@180` sends before the time limit
        assert proc.wait(timeout=300) == 0, first_log.read_text()[-4000:]
    saved = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert 5 <= saved < 30, saved
    assert "pre-emption signal (SIGUSR1)" in first_log.read_text()
    assert not (root / "hf").exists()  # a pre-empted run does not export its intermediate weights
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]

    resumed_log = tmp_path / "resumed.log"
    with open(resumed_log, "w") as fh:
        proc = subprocess.run(_sft_command(tiny_model_dir, root, "--ckpt_path", "last"), stdout=fh,
                              stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, resumed_log.read_text()[-4000:]
    assert "Restoring states from the checkpoint path" in resumed_log.read_text()
    (_, second) = sorted((root / "csv").glob("version_*"))
    with open(second / "metrics.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    assert steps[0] == saved and steps[-1] == 29  # it continued from the saved step and finished
    assert (root / "hf" / "model.safetensors").exists()


@pytest.mark.timeout(600)
def test_sigterm_without_the_preemption_callback_logs_and_checkpoints(tiny_model_dir, tmp_path):
    """A plain run (no PreemptionCheckpoint in its config) that gets SIGTERM: qed-fit's own SIGTERM handler logs the
    signal, saves last.ckpt at the step boundary and stops (it used to exit 0 with nothing saved and no line). The
    same run shows that `--trainer.max_steps` on the command line reaches the LR schedule (the YAML says 40)."""
    root, log = tmp_path / "run", tmp_path / "run.log"
    cmd = [sys.executable, "-m", "qed_lightning.cli", "--config", str(REPO / "configs/demo/sft.yaml"),
           "--trainer.default_root_dir", str(root), "--trainer.max_steps", "1000",
           "--model.init_args.model_name_or_path", str(tiny_model_dir),
           "--model.init_args.export_dir", str(root / "hf"),
           "--data.init_args.path", str(REPO / "data/samples/fineproofs_sft.jsonl")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 300
        # the model is loaded: the handlers are in place (setup comes first)
        while "parameters)" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never loaded its model"
            time.sleep(0.1)
        time.sleep(3)  # a few steps
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "pre-emption signal (SIGTERM): saving" in text, text[-4000:]
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert 1 <= ckpt["global_step"] < 1000
    assert ckpt["lr_schedulers"][0]["total_steps"] == 1000
    assert not (root / "hf").exists()  # stopped early: no export of intermediate weights


def test_gpu_check_compiles_and_fails_fast_without_a_gpu(tmp_path):
    import py_compile

    py_compile.compile(str(REPO / "scripts/gpu_check.py"), cfile=str(tmp_path / "gpu_check.pyc"), doraise=True)
    if subprocess.run(["sh", "-c", "nvidia-smi -L"], capture_output=True).returncode == 0:
        pytest.skip("a GPU is present: run scripts/gpu_check.sh itself")
    shell = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert shell.returncode == 2 and "no NVIDIA GPU" in shell.stderr
    python = subprocess.run([sys.executable, str(REPO / "scripts/gpu_check.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert python.returncode == 2 and "no CUDA device" in python.stderr
    assert not any(tmp_path.glob("model"))  # nothing was built before the check


def _fake_tool(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("sync", ["checkpoint", "nccl"])
def test_vllm_pool_sbatch_starts_each_server_on_its_inherited_device_with_the_syncs_settings(sync, tmp_path):
    """The pool script run as SLURM would (a fake `scontrol`, an `srun` that runs the node's task here, a `python`
    that records how each server was started): servers index the task's CUDA_VISIBLE_DEVICES (4,5 -> server 0 on
    GPU 4, server 1 on GPU 5), and `SYNC=nccl` starts them with vLLM's NCCL weight transfer."""
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    _fake_tool(bin_dir / "scontrol", "echo gpu017\n")
    _fake_tool(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    record = tmp_path / "servers"  # one file per server: the servers start side by side
    record.mkdir()
    _fake_tool(venv / "bin" / "python", f"{sys.executable} -c 'import json, os, sys; print(json.dumps("
               f"[os.environ[\"CUDA_VISIBLE_DEVICES\"], sys.argv[1:]]))' \"$@\" > {record}/$$.json\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "gpu017",
           "SLURM_SUBMIT_DIR": str(tmp_path), "QED_VENV": str(venv), "GPUS_PER_NODE": "2", "SYNC": sync,
           "CUDA_VISIBLE_DEVICES": "4,5"}
    proc = subprocess.run(["bash", str(REPO / "scripts/slurm/vllm_pool.sbatch"), "/models/policy"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    servers = sorted(json.loads(path.read_text()) for path in record.glob("*.json"))
    assert [devices for devices, _ in servers] == ["4", "5"]
    for _, argv in servers:
        assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"] and "/models/policy" in argv
        has_transfer = "--weight-transfer-config" in argv
        assert has_transfer == (sync == "nccl")
        if has_transfer:
            assert json.loads(argv[argv.index("--weight-transfer-config") + 1]) == {"backend": "nccl"}
    assert (tmp_path / "runs/pool/urls-77.txt").read_text().split() == ["http://gpu017:8000", "http://gpu017:8001"]
    env["SYNC"] = "ncl"
    bad = subprocess.run(["bash", str(REPO / "scripts/slurm/vllm_pool.sbatch"), "/m"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "SYNC=ncl: use checkpoint or nccl" in bad.stderr
