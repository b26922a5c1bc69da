"""Experiment trackers through the real entry point: one `qed-fit` RL run (a subprocess, so W&B's offline writer
finishes as it would for a user) with the three configs of `configs/logger/` composed onto the demo config. Each
tracker must hold the metrics, the config and the judge/prompt versions as hyperparameters, and a rollout table; the
CSV metrics that `qed-report` reads stay."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qed_lightning.callbacks.rollout_table import COLUMNS
from runs import read_metrics, series

REPO = Path(__file__).resolve().parents[2]
STEPS = 2


@pytest.fixture(scope="module")
def logged_run(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loggers")
    cmd = [sys.executable, "-m", "qed_lightning.cli", "--config", str(REPO / "configs/demo/rl.yaml"),
           *(f"--config={REPO / 'configs/logger' / name}.yaml" for name in ("tensorboard", "wandb", "mlflow")),
           "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(STEPS),
           "--model.init_args.model_name_or_path", str(tiny_model_dir), "--model.init_args.export_hf", "false",
           # the engine is not under test
           "--model.init_args.engine", '{"class_path": "qed_lightning.rollout.HFEngine"}',
           "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"),
           "--data.init_args.val_size", "0",
           "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl")]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def test_csv_metrics_stay_beside_the_trackers(logged_run):
    rows = read_metrics(logged_run)
    assert len(series(rows, "rollout/reward_mean")) == STEPS
    assert len(list((logged_run / "rollouts").glob("step_*.jsonl"))) == STEPS  # the records the tables sample


def test_tensorboard_event_files_hold_metrics_hyperparameters_and_the_rollout_table(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = sorted((logged_run / "tb").glob("version_*"))
    events = EventAccumulator(str(version), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert len(events.Scalars("rollout/reward_mean")) == STEPS and len(events.Scalars("judge/score_0")) == STEPS
    (table,) = events.Tensors("rollouts/text_summary")  # step 0 only: every_n_steps is 10
    text = table.tensor_proto.string_val[0].decode()
    assert text.startswith("| " + " | ".join(COLUMNS)) and len(text.split("\n")) == 2 + 16  # header, rule, 16 rollouts
    hparams = yaml.safe_load((version / "hparams.yaml").read_text())
    assert hparams["qed/judge_prompt"].startswith("rubric_v1@") and hparams["qed/policy_prompt"].startswith("policy@")
    assert hparams["config/model.init_args.group_size"] == 4  # the whole config, flattened


def _wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of chunks with 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, pending, out = path.read_bytes(), 7, b"", []  # 7 bytes of file header (":W&B", magic, version)
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def test_offline_wandb_run_holds_metrics_config_and_the_rollout_table(logged_run):
    (run_file,) = (logged_run / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    config = {i.key: json.loads(i.value_json)
              for r in records if r.WhichOneof("record_type") == "config" for i in r.config.update}
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert config["qed/judge_prompt"].startswith("rubric_v1@") and config["config/trainer.max_steps"] == STEPS
    assert len([h for h in history if "rollout/reward_mean" in h]) == STEPS
    (table,) = [h for h in history if h.get("rollouts/_type") == "table-file"]
    content = json.loads((run_file.parent / "files" / table["rollouts/path"]).read_text())
    assert content["columns"] == list(COLUMNS) and len(content["data"]) == 16


def test_mlflow_file_store_holds_metrics_params_and_the_rollout_artifact(logged_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{logged_run}/mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("qed-lightning").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "rollout/reward_mean")) == STEPS
    assert run.data.params["qed/judge"] == "RubricJudge" and run.data.params["qed/engine"] == "HFEngine"
    (artifact,) = client.list_artifacts(run.info.run_id, "rollouts")
    local = client.download_artifacts(run.info.run_id, artifact.path, str(logged_run / "download"))
    table = json.loads(Path(local).read_text())
    assert artifact.path == "rollouts/step_000000.json"
    assert table["columns"] == list(COLUMNS) and len(table["data"]) == 16
