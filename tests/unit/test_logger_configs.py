"""The tracker configs compose with every stage config: each adds its logger and its rollout table to what the stage
config has (its callbacks stay), the CSV metrics stay first, and the trackers write under the run's root."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import qed_lightning.callbacks.hparams
from qed_lightning.cli import make_cli

REPO = Path(__file__).resolve().parents[2]
STAGES = ["configs/sft.yaml", "configs/rl.yaml", "configs/rc.yaml", "configs/demo/rl.yaml"]
LOGGERS = {"tensorboard": "TensorBoardLogger", "wandb": "WandbLogger", "mlflow": "MLFlowLogger"}


@pytest.mark.parametrize("stage", STAGES)
def test_all_three_trackers_compose_onto_a_stage_config(stage, print_config):
    alone = print_config(stage)["trainer"]
    both = print_config(stage, *(f"configs/logger/{name}.yaml" for name in LOGGERS))["trainer"]
    alone_paths = [c["class_path"] for c in alone["callbacks"]]
    assert [c["class_path"] for c in both["callbacks"]][:len(alone_paths)] == alone_paths
    tables = [c["init_args"]["to"] for c in both["callbacks"] if c["class_path"].endswith("RolloutTable")]
    assert tables == list(LOGGERS)  # one table per tracker, each to its own
    assert [lg["class_path"].rsplit(".", 1)[1] for lg in both["logger"]] == list(LOGGERS.values())
    assert any(c["class_path"].endswith("QEDProgressBar") for c in alone["callbacks"])  # every stage shows its phases


def test_csv_stays_first_and_trackers_write_under_the_run_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cli = make_cli(args=["--config", str(REPO / "configs/demo/rl.yaml"),
                         *(f"--config={REPO / 'configs/logger' / name}.yaml" for name in ("tensorboard", "mlflow")),
                         "--trainer.default_root_dir", str(tmp_path)], run=False)
    names = [type(lg).__name__ for lg in cli.trainer.loggers]
    assert names == ["CSVLogger", "TensorBoardLogger", "MLFlowLogger"]
    csv, tensorboard, mlflow = cli.trainer.loggers
    assert Path(csv.log_dir).parent == tmp_path / "csv" and Path(tensorboard.root_dir) == tmp_path / "tb"
    assert mlflow._tracking_uri == f"file:{tmp_path}/mlruns"


def test_doctests():
    assert doctest.testmod(qed_lightning.callbacks.hparams).failed == 0


def test_rollout_table_rows_are_spread_over_the_step_and_cut():
    from qed_lightning.callbacks.rollout_table import COLUMNS, _markdown, table_rows

    records = [{"step": 3, "problem_id": k, "sample": 0, "score": k % 8, "reward": 0.5, "advantage": 0.1,
                "status": "ok", "completion_tokens": 9, "proof": "p|" * 10 if k else None,
                "completion": "raw\ntext", "judge_reply": "r"}
               for k in range(10)]
    rows = table_rows(records, rows=4, max_chars=5)
    assert [r[COLUMNS.index("problem_id")] for r in rows] == [0, 3, 6, 9]  # first, last and evenly between
    assert rows[0][COLUMNS.index("proof")] == "raw\ntext"[:5] + " [... 3 more characters]"  # not graded: the completion
    assert rows[1][COLUMNS.index("proof")] == "p|p|p [... 15 more characters]"
    table = _markdown(rows).split("\n")
    assert len(table) == 2 + 4 and table[2].count(" | ") == len(COLUMNS) - 1  # a | inside a proof is escaped
