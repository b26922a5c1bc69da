"""configs/layout/one_node_async.yaml composes with every RL stage config, and its knobs are refused at the door."""

from __future__ import annotations

from pathlib import Path

import pytest

from qed_lightning.cli import make_cli
from qed_lightning.rollout import LocalVLLMPool, StreamingRollouts

REPO = Path(__file__).resolve().parents[2]
LAYOUT = REPO / "configs/layout/one_node_async.yaml"


@pytest.mark.parametrize("stage", ["rl.yaml", "rc.yaml", "demo/rl.yaml", "demo/rc.yaml"])
def test_the_async_layout_composes_with_every_rl_stage(stage, print_config):
    base = print_config(REPO / "configs" / stage)
    composed = print_config(REPO / "configs" / stage, LAYOUT)
    engine = composed["model"]["init_args"]["engine"]
    assert engine["class_path"] == "qed_lightning.rollout.StreamingRollouts" and engine["init_args"]["max_lag"] == 1
    pool = engine["init_args"]["engine"]
    assert pool["class_path"] == "qed_lightning.rollout.LocalVLLMPool"
    init = pool["init_args"]
    assert (init["cpus"], init["trainer_cpus"], init["update_mode"]) == (["1"], "0", "wait")
    # only the engine changes: the stage's own knobs (and the paper's IS setting: off) are untouched
    strip = lambda cfg: {k: v for k, v in cfg["model"]["init_args"].items() if k != "engine"}  # noqa: E731
    assert strip(composed) == strip(base) and composed["data"] == base["data"]
    assert composed["model"]["init_args"]["is_correction"] == "none"


def test_the_layouts_knobs_are_checked_before_anything_starts():
    with pytest.raises(ValueError, match="max_lag must be >= 0"):
        StreamingRollouts(LocalVLLMPool(), max_lag=-1)
    with pytest.raises(ValueError, match="either engine.cpus .* or engine.gpus"):
        LocalVLLMPool(cpus=["1"], gpus=["0"])
    with pytest.raises(SystemExit):  # an unknown update mode is refused by the CLI, naming the choices
        make_cli(args=["fit", "--config", str(REPO / "configs/demo/rl.yaml"), "--config", str(LAYOUT),
                       "--model.init_args.engine.init_args.engine.init_args.update_mode", "abort", "--print_config"])


def test_is_correction_knobs_are_validated(capsys):
    with pytest.raises(SystemExit):
        make_cli(args=["fit", "--config", str(REPO / "configs/demo/rl.yaml"), "--model.init_args.is_correction", "clip",
                       "--print_config"])
    assert "is_correction" in capsys.readouterr().err


def test_pool_servers_index_the_inherited_cuda_devices():
    """Server 0 on local device 0 of a trainer started with CUDA_VISIBLE_DEVICES=4,5,6,7 gets GPU 4, not GPU 0 (which
    belongs to another job without SLURM's device cgroups); without the variable the indices are the devices."""
    from qed_lightning.rollout.engines.local_servers import visible_devices

    assert visible_devices("0", "4,5,6,7") == "4" and visible_devices("2,3", "4,5,6,7") == "6,7"
    assert visible_devices("1", None) == "1" and visible_devices("0,1", "") == "0,1"
    with pytest.raises(ValueError, match=r"gpus entry '4' asks for local device 4, but CUDA_VISIBLE_DEVICES=4,5"):
        visible_devices("4", "4,5")
    pool = LocalVLLMPool(gpus=["0", "2,3"])
    env = pool.processes.env("2,3", {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "RANK": "0", "LOCAL_RANK": "0",
                                      "MASTER_PORT": "29500", "PATH": "/bin"})
    assert env == {"CUDA_VISIBLE_DEVICES": "6,7", "VLLM_SERVER_DEV_MODE": "1", "PATH": "/bin"}  # no rank variables


def test_pool_server_commands_and_the_guard_that_starts_them():
    """What each server is started with: the flags the pool relies on, tensor parallelism over a GPU entry, whole
    prefills on CPU; and the guard in front of it (parent-death signal and cores set in the child, not in a
    `preexec_fn` of the trainer)."""
    import os
    import sys

    from qed_lightning.rollout.engines.server_guard import guard_command

    gpu = LocalVLLMPool(gpus=["0,1"], dtype="bfloat16").processes.command("/m", 8123, "0,1")
    assert gpu[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    flags = {gpu[i]: gpu[i + 1] for i in range(3, len(gpu) - 1)}
    assert (flags["--port"], flags["--dtype"], flags["--tensor-parallel-size"], flags["--host"]) == \
        ("8123", "bfloat16", "2", "127.0.0.1")
    assert "--enable-scale-out" in gpu and "--logprobs-mode" in gpu and "--enforce-eager" not in gpu
    cpu_pool = LocalVLLMPool(cpus=["1"], max_model_len=2048, kv_cache_gib=2)
    cpu = cpu_pool.processes.command("/m", 8124, "1")
    assert cpu[cpu.index("--dtype") + 1] == "float32" and "--no-enable-chunked-prefill" in cpu
    assert cpu_pool.processes.env("1-2", {})["OMP_NUM_THREADS"] == "2"
    guarded = guard_command(cpu, cpus="1")
    assert guarded[1:3] == ["-m", "qed_lightning.rollout.engines.server_guard"]
    assert guarded[guarded.index("--parent") + 1] == str(os.getpid()) and guarded[guarded.index("--cpus") + 1] == "1"
    assert guarded[guarded.index("--") + 1:] == cpu


def test_the_pool_refuses_a_trainer_over_several_nodes(monkeypatch, tmp_path):
    """Its servers listen on 127.0.0.1 of global rank 0: ranks on another node could not reach them (before: a
    900 s wait and a timeout). Refused in one line before any server starts."""
    from qed_lightning.rollout.engines import local_pool

    monkeypatch.setattr(local_pool, "gather_objects", lambda obj: ["gpu-017", "gpu-017", "gpu-018", "gpu-018"])
    pool = LocalVLLMPool(cpus=["1"])
    pool.use_run_dir(tmp_path)
    with pytest.raises(ValueError, match=r"LocalVLLMPool runs on one node .* spans 2 \(gpu-017, gpu-018\): use "
                                         r"VLLMServerEngine"):
        pool.start("/some/model")
    assert pool.processes.procs == [] and not (tmp_path / ".weights").exists()


def test_a_killed_runs_weights_are_found_and_removed_with_their_size(tmp_path, caplog):
    from qed_lightning.rollout.engines.local_pool import remove_leftovers

    folder = tmp_path / ".weights"
    (folder / "v3").mkdir(parents=True)
    (folder / "v3" / "model-00001.safetensors").write_bytes(b"x" * 3000)
    (folder / "loaded_version").write_text("2")
    with caplog.at_level("WARNING"):
        assert remove_leftovers(folder) == 3001
    assert list(folder.iterdir()) == []
    assert "removing 2 leftover(s) of an earlier run" in caplog.text and "loaded_version, v3" in caplog.text
    assert remove_leftovers(tmp_path / "missing") == 0
