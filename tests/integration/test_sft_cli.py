"""Stage 1 through the real entry point: `qed-fit --config configs/demo/sft.yaml` on the tiny model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qed_lightning.cli import make_cli

REPO = Path(__file__).resolve().parents[2]


def _losses(metrics_csv: Path) -> list[float]:
    with open(metrics_csv) as fh:
        return [float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")]


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    args = [
        "--config", str(REPO / "configs/demo/sft.yaml"),
        "--trainer.default_root_dir", str(root),
        "--model.init_args.model_name_or_path", str(tiny_model_dir),
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_sft.jsonl"),
        "--model.init_args.export_dir", str(root / "csv" / "version_0" / "hf"),
    ]
    make_cli(args=args)
    (run_dir,) = sorted((root / "csv").glob("version_*"))
    assert (run_dir / "hf" / "config.json").exists()
    return run_dir


def test_demo_sft_loss_falls(sft_run):
    losses = _losses(sft_run / "metrics.csv")
    assert len(losses) >= 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # a 0.36M-parameter model at lr 3e-3 on the bundled samples starts near ln(512) = 6.2 nats and falls by about
    # 1 nat in 40 steps (measured 6.0 -> 5.0 with seed 0); half a nat is a clear, seed-robust margin
    assert first > 5.5
    assert last < first - 0.5, (first, last)


def test_demo_sft_logs_throughput_padding_and_data_counts(sft_run):
    with open(sft_run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    tps = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")]
    pad = [float(r["train/padding_fraction"]) for r in rows if r.get("train/padding_fraction")]
    assert tps and min(tps) > 0
    assert pad and all(0.0 <= p < 1.0 for p in pad)
    examples = [float(r["data/examples"]) for r in rows if r.get("data/examples")]
    assert examples == [24.0] or (examples and examples[0] >= 24)
    assert (sft_run / "config.yaml").exists()


def test_every_trainable_parameter_changed(sft_run, tiny_model_dir):
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(sft_run / "hf" / "model.safetensors"))
    assert set(before) == set(after)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []


def test_exported_model_reloads_in_transformers(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft_run / "hf")
    model = AutoModelForCausalLM.from_pretrained(sft_run / "hf")
    ids = tok.apply_chat_template([{"role": "user", "content": "Prove it."}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]


VLLM_SCRIPT = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1, max_model_len=1024)
    out = llm.generate(["<|im_start|>user\nProve it.<|im_end|>\n<|im_start|>assistant\n<think>\n"],
                       SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    print("RESULT " + json.dumps({"ids": list(out[0].outputs[0].token_ids)}))
"""


@pytest.mark.slow
def test_exported_model_generates_in_vllm(sft_run, tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(sft_run / "hf")], capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    assert len(json.loads(line[7:])["ids"]) > 0


@pytest.mark.slow
def test_chunked_lm_head_loss_trains_as_the_full_logits_loss(tiny_model_dir, tmp_path):
    """The default loss (labelled positions only, LM head in checkpointed chunks) and `loss_chunk_tokens: 0` (every
    position's logits at once) give the same losses, step after step."""
    losses = {}
    for chunk in ("0", "64"):
        root = tmp_path / f"chunk{chunk}"
        make_cli(args=["--config", str(REPO / "configs/demo/sft.yaml"), "--trainer.default_root_dir", str(root),
                       "--trainer.max_steps", "3", "--trainer.callbacks", "[]",
                       "--trainer.enable_checkpointing", "false",
                       "--model.init_args.export_hf", "false", "--model.init_args.loss_chunk_tokens", chunk,
                       "--model.init_args.model_name_or_path", str(tiny_model_dir),
                       "--data.init_args.path", str(REPO / "data/samples/fineproofs_sft.jsonl")])
        (metrics,) = sorted((root / "csv").glob("version_*/metrics.csv"))
        losses[chunk] = _losses(metrics)
    assert len(losses["0"]) == 3 and len(set(losses["0"])) == 3
    torch.testing.assert_close(torch.tensor(losses["64"]), torch.tensor(losses["0"]), atol=1e-5, rtol=0)
