"""`qed-export` writes a model card beside the weights: a real RL run's checkpoint (the transformers engine, one step),
exported by the `qed-export` command; and `--push_to_hub` goes through huggingface_hub's upload API (recorded here:
no hub is reachable from our machines)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import yaml

from qed_lightning.cli import make_cli
from qed_lightning.tools.export import push_to_hub

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rl_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card")
    make_cli(args=[
        "--config", str(REPO / "configs/demo/rl.yaml"), "--trainer.default_root_dir", str(root), "--trainer.max_steps", "1",
        "--trainer.callbacks.every_n_train_steps=1", "--model.init_args.model_name_or_path", str(tiny_model_dir),
        "--model.init_args.export_hf", "false", "--model.init_args.engine", '{"class_path": "qed_lightning.rollout.HFEngine"}',
        "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"), "--data.init_args.val_size", "0",
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"),
    ])
    return root / "checkpoints" / "last.ckpt"


def test_exported_folder_has_a_card_with_stage_data_judge_steps_and_evaluation(rl_checkpoint, tiny_model_dir, tmp_path):
    summary = {"benchmark": "IMOProofBench", "path": "data/samples/imo_proofbench.jsonl", "n": 2, "judge": "j@1",
               "scaffolds": {"direct": {"overall": {"n": 6, "score_pct": 42.9, "std_pct": 3.5, "best_of_n_pct": 57.1}}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "qed_lightning.tools.export", str(rl_checkpoint), str(out),
                    "--eval_summary", str(tmp_path / "summary.json")], check=True, cwd=REPO, timeout=300)
    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert yaml.safe_load(front)["tags"][:2] == ["qed-lightning", "theorem-proving"]
    for fact in ("stage 2: rubric-judge RL", f"`{tiny_model_dir}`", f"`{REPO / 'data/samples/fineproofs_rl.jsonl'}`",
                 "| optimizer steps | `1` |", "`ScriptedJudgeClient`", "`rubric_v1`", "| learning rate | `0.003` |",
                 "The judge was a scripted stand-in", "| direct | 6 | 42.9 | 3.5 | 57.1 |"):
        assert fact in body, fact
    assert (out / "model.safetensors").exists()  # the card sits beside the weights


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)) or "https://hub/commit/1")
    assert push_to_hub(tmp_path, "me/qed-nano", private=True) == "https://hub/commit/1"
    assert [c[:2] for c in calls] == [("create", "me/qed-nano"), ("upload", "me/qed-nano")]
    assert calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert calls[1][2]["folder_path"] == str(tmp_path) and calls[1][2]["repo_type"] == "model"
