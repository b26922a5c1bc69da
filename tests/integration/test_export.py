"""`qed-export` on a single-file Lightning checkpoint (one device / DDP): the HF folder holds the trained weights.
(The sharded FSDP2 directory case is in test_distributed.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qed_lightning.cli import make_cli
from qed_lightning.tools.export import checkpoint_kind, export_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_single_file_checkpoint_exports_to_the_final_weights(tiny_model_dir, tmp_path):
    make_cli(args=[
        "--config", str(REPO / "configs/demo/sft.yaml"), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "3", "--model.init_args.model_name_or_path", str(tiny_model_dir),
        "--model.init_args.export_dir", str(tmp_path / "hf"),
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_sft.jsonl"),
        "--trainer.callbacks.every_n_train_steps=3",  # the config's AtomicModelCheckpoint (save_last: true)
    ])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint_kind(ckpt) == "file"
    out = export_checkpoint(ckpt, tmp_path / "exported")  # config + tokenizer from the run's model_name_or_path
    exported, trained = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(exported) == set(trained) and all(torch.equal(exported[k], trained[k]) for k in trained)
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert not torch.equal(exported["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])  # trained
    assert (out / "tokenizer.json").exists()
    with pytest.raises(ValueError, match="neither"):
        checkpoint_kind(tmp_path)  # a folder that is no checkpoint
