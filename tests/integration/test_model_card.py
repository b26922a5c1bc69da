"""`qed-export` writes a model card beside the weights: a real RL run's checkpoint (the transformers engine, one step),
exported by the `qed-export` command (built with huggingface_hub's ModelCard, files readable by the group); the base
model carried through local stage chains; an evaluation of another model left out; and `--push_to_hub` goes through
huggingface_hub's upload API (recorded here: no hub is reachable from our machines)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import huggingface_hub
import pytest
import yaml

from qed_lightning.cli import make_cli
from qed_lightning.tools.export import push_to_hub, write_card
from qed_lightning.tools.model_card import base_model_chain, build_model_card, card_facts

REPO = Path(__file__).resolve().parents[2]
SUMMARY = {"benchmark": "IMOProofBench", "path": "data/samples/imo_proofbench.jsonl", "n": 2, "judge": "j@1",
           "scaffolds": {"direct": {"overall": {"n": 6, "score_pct": 42.9, "std_pct": 3.5, "best_of_n_pct": 57.1}}}}


@pytest.fixture(scope="module")
def rl_checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card")
    make_cli(args=[
        "--config", str(REPO / "configs/demo/rl.yaml"), "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", "1",
        "--trainer.callbacks.every_n_train_steps=1", "--model.init_args.model_name_or_path", str(tiny_model_dir),
        "--model.init_args.export_hf", "false",
        "--model.init_args.engine", '{"class_path": "qed_lightning.rollout.HFEngine"}',
        "--model.init_args.judge.init_args.cache_path", str(root / "grades.sqlite"), "--data.init_args.val_size", "0",
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"),
    ])
    return root / "checkpoints" / "last.ckpt"


def test_exported_folder_has_a_card_with_stage_data_judge_steps_and_evaluation(rl_checkpoint, tiny_model_dir, tmp_path):
    out = tmp_path / "exported"
    (tmp_path / "summary.json").write_text(json.dumps({**SUMMARY, "model": str(out)}))  # qed-eval of this export
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
    card = huggingface_hub.ModelCard.load(out / "README.md")  # metadata the Hub reads: the eval as model-index
    assert [(r.dataset_name, r.metric_value) for r in card.data.eval_results] == [("IMOProofBench", 42.9)]
    assert "## Framework versions" in body and f"- transformers: {version('transformers')}" in body
    for path in out.iterdir():  # the team can read what was exported
        assert path.stat().st_mode & 0o040, (path.name, oct(path.stat().st_mode))


def _facts_of_stage(model_name_or_path: Path | str) -> dict:
    return card_facts({"hyper_parameters": {"_class_path": "qed_lightning.modules.RubricRLModule",
                                            "model_name_or_path": str(model_name_or_path)}, "global_step": 3}, None)


def test_the_base_model_is_carried_through_local_stage_chains(tmp_path):
    sft = tmp_path / "runs/sft"  # stage 1 from the hub, exported by export_hf to <run>/hf (no card there)
    (sft / "hf").mkdir(parents=True)
    (sft / "hf/config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (sft / "csv/version_0").mkdir(parents=True)
    (sft / "csv/version_0/config.yaml").write_text("model:\n  init_args:\n    model_name_or_path: Qwen/Qwen3-4B\n")
    facts = _facts_of_stage(sft / "hf")  # stage 2 started from runs/sft/hf
    assert facts["base_model"] == str(sft / "hf") and facts["origin_model"] == "Qwen/Qwen3-4B"
    card = build_model_card("me/rl", facts, versions={})
    assert card.data.base_model == "Qwen/Qwen3-4B" and f"| started from | `{sft / 'hf'}` |" in card.text
    rl = tmp_path / "runs/rl-export"  # stage 2 exported by qed-export (a card): stage 3 from it names the hub model too
    rl.mkdir(parents=True)
    card.save(rl / "README.md")
    assert base_model_chain(str(rl)) == [str(rl), "Qwen/Qwen3-4B"]
    assert build_model_card("me/rc", _facts_of_stage(rl), versions={}).data.base_model == "Qwen/Qwen3-4B"
    assert "base_model" not in build_model_card("x", _facts_of_stage(tmp_path / "nowhere"), versions={}).data.to_dict()


def test_an_evaluation_of_another_model_is_left_out_of_the_card(tmp_path, caplog):
    out = tmp_path / "exported"
    out.mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({**SUMMARY, "model": "runs/sft/hf"}))
    with caplog.at_level(logging.WARNING):
        write_card(out, {"hyper_parameters": {}}, tmp_path / "last.ckpt", eval_summary=tmp_path / "summary.json")
    assert "## Evaluation" not in (out / "README.md").read_text()
    assert "--eval_summary" in caplog.text and "scored model 'runs/sft/hf', not this export" in caplog.text
    (tmp_path / "summary.json").write_text(json.dumps({**SUMMARY, "model": "me/qed-nano"}))  # the repo it is pushed to
    write_card(out, {"hyper_parameters": {}}, tmp_path / "last.ckpt", eval_summary=tmp_path / "summary.json",
               repo_id="me/qed-nano")
    assert "| direct | 6 | 42.9 | 3.5 | 57.1 |" in (out / "README.md").read_text()


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)) or "https://hub/commit/1")
    assert push_to_hub(tmp_path, "me/qed-nano", private=True) == "https://hub/commit/1"
    assert [c[:2] for c in calls] == [("create", "me/qed-nano"), ("upload", "me/qed-nano")]
    assert calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert calls[1][2]["folder_path"] == str(tmp_path) and calls[1][2]["repo_type"] == "model"
