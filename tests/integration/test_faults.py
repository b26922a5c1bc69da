"""Numerical faults and secrets: a non-finite step changes no weight and is logged, and leaves a colocated engine that
sleeps at level 2 (its weights discarded) awake with the trainer's weights; N in a row abort the run; an API
key from the environment appears in no log, checkpoint or saved config; judge replies cut off by their token limit
never score; a judge that fails more of a step's grades than `max_failure_fraction` stops the run before it trains."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from qed_lightning.cli import make_cli
from qed_lightning.data import ProofRLDataModule
from qed_lightning.modules import RubricRLModule
from qed_lightning.rewards import RubricJudge
from qed_lightning.rollout import HFEngine
from qed_lightning.testing import ScriptedJudgeClient

REPO = Path(__file__).resolve().parents[2]


class NaNOnCalls(RubricRLModule):
    """Makes the loss NaN on the given training-step calls (1-based) and records whether each step moved weights."""

    def __init__(self, *args, nan_calls: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_calls, self.calls, self.moved = set(nan_calls), 0, []

    def training_step(self, batch, batch_idx):
        self.calls += 1
        before = [p.detach().clone() for p in self.parameters()]
        super().training_step(batch, batch_idx)
        self.moved.append(any(not torch.equal(b, p) for b, p in zip(before, self.parameters())))

    def compute_loss(self, *args, **kwargs):
        loss, metrics = super().compute_loss(*args, **kwargs)
        return (loss * float("nan"), metrics) if self.calls in self.nan_calls else (loss, metrics)


def _fit(tiny: Path, root: Path, nan_calls: tuple[int, ...], max_steps: int, engine=None) -> NaNOnCalls:
    judge = RubricJudge(ScriptedJudgeClient(rule="char_fraction", charset="aeiou"), require_think_close=False)
    module = NaNOnCalls(str(tiny), engine=engine or HFEngine(), judge=judge, group_size=2, max_new_tokens=8,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), nan_calls=nan_calls, max_nonfinite_steps=3)
    data = ProofRLDataModule(str(REPO / "data/samples/fineproofs_rl.jsonl"), tokenizer=str(tiny), prompts_per_step=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root, enable_progress_bar=False,
                        logger=L.pytorch.loggers.CSVLogger(root, name="csv"), enable_checkpointing=False,
                        log_every_n_steps=1)
    try:
        trainer.fit(module, datamodule=data)
    finally:
        judge.close()
    return module


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_logged_and_leaves_a_sleeping_engine_awake(tiny_model_dir, tmp_path, caplog):
    """The colocated vLLM engine sleeps at level 2 after each sampling (its weights discarded; on CPU the bookkeeping
    runs, the memory calls are no-ops). A skipped step does not advance `global_step`, so there is no new version to
    push: the callback pushes the unchanged weights again, and the next step generates (it raised before). The first
    step (global step 0) and a later one are skipped, each under `max_nonfinite_steps: 3`."""
    from qed_lightning.rollout import VLLMEngine

    caplog.set_level(logging.WARNING)
    engine = VLLMEngine(max_model_len=1024, enable_sleep_mode=True, sleep_level=2)
    module = _fit(tiny_model_dir, tmp_path, nan_calls=(1, 3), max_steps=3, engine=engine)
    # calls 2, 4, 5 stepped; calls 1 and 3 (NaN) changed nothing, and did not count as optimizer steps
    assert module.moved == [False, True, False, True, True]
    assert "non-finite loss" in caplog.text and "skipped, weights unchanged" in caplog.text
    (run,) = (tmp_path / "csv").glob("version_*")
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    skipped = [float(r["train/nonfinite_skipped"]) for r in rows if r.get("train/nonfinite_skipped")]
    assert skipped == [1.0, 0.0, 1.0, 0.0, 0.0]
    # a push after every call: the same version again after a skipped one (0, then 1), a new one after a step
    assert [float(r["rollout/policy_version"]) for r in rows if r.get("rollout/policy_version")] == [0, 1, 1, 2, 3]
    assert engine.policy_version == 3 and engine.sleeping == frozenset()
    assert engine.handoff_counts == {"sleep": 5, "wake": 10}  # slept after each sampling, woke twice per push


def test_consecutive_non_finite_steps_abort_with_a_clear_message(tiny_model_dir, tmp_path):
    with pytest.raises(FloatingPointError,
                       match=r"3 consecutive non-finite steps; lower the learning rate or raise "
                             r"model.max_nonfinite_steps"):
        _fit(tiny_model_dir, tmp_path, nan_calls=(1, 2, 3, 4), max_steps=4)


def test_api_key_appears_in_no_log_checkpoint_or_config(tiny_model_dir, tmp_path, monkeypatch, capfd):
    secret = "sk-qed-test-" + "9" * 24
    monkeypatch.setenv("QED_TEST_JUDGE_KEY", secret)
    make_cli(args=[
        "--config", str(REPO / "configs/demo/rl.yaml"), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "2", "--trainer.callbacks.every_n_train_steps=1",
        "--model.init_args.model_name_or_path", str(tiny_model_dir),
        "--model.init_args.export_dir", str(tmp_path / "hf"),
        "--model.init_args.judge.init_args.cache_path", str(tmp_path / "grades.sqlite"),
        "--model.init_args.judge.init_args.client.init_args.api_key_env", "QED_TEST_JUDGE_KEY",
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl"),
    ])
    out, err = capfd.readouterr()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.name == "config.yaml" for p in files)
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaks == [] and secret not in out + err
    # and the key really was used: the scripted server saw it on the wire (a Bearer header)
    assert "QED_TEST_JUDGE_KEY" in (tmp_path / "csv" / "version_0" / "config.yaml").read_text()


def test_judge_replies_cut_off_by_their_token_limit_never_score_through_qed_fit(tiny_model_dir, tmp_path):
    """Every judge reply of a demo RL step is cut off by its token limit right after quoting the proof (the scripted
    server's `truncate` fault: `finish_reason: length`): none scores, none is cached, each is counted and recorded.
    (A forged `<score>7</score>` in the proof, quoted by such a reply, is pinned per API in test_rewards_judge.py.)"""
    import json

    from qed_lightning.rewards import GradeCache
    from runs import read_metrics, series

    make_cli(args=[
        "--config", str(REPO / "configs/demo/rl.yaml"), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "1", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
        "--trainer.limit_val_batches", "0", "--model.init_args.model_name_or_path", str(tiny_model_dir),
        "--model.init_args.judge.init_args.cache_path", str(tmp_path / "grades.sqlite"),
        "--model.init_args.judge.init_args.require_think_close", "false",
        "--model.init_args.judge.init_args.max_failure_fraction", "1",  # every grade fails: counted, not stopped
        "--model.init_args.judge.init_args.client.init_args.faults", json.dumps(["truncate"] * 64),
        "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl")])
    rows = read_metrics(tmp_path)
    graded = [json.loads(line) for f in sorted((tmp_path / "rollouts").glob("*.jsonl"))
              for line in f.read_text().splitlines() if line]
    judged = [r for r in graded if r["status"] != "truncated"]  # an empty proof is scored 0 without a judge call
    assert judged and all(r["status"] == "incomplete" and r["score"] is None for r in judged)
    assert series(rows, "judge/incomplete") == [float(len(judged))] and series(rows, "judge/ok") == [0.0]
    assert series(rows, "judge/failure_fraction") == [1.0]
    assert all(r["reward"] == 0.0 for r in judged)  # on_failure: zero, counted apart, never a 7
    assert len(GradeCache(tmp_path / "grades.sqlite")) == 0  # nothing cached: the next run asks again


def test_a_judge_failing_past_max_failure_fraction_stops_the_step_through_qed_fit(tiny_model_dir, tmp_path):
    """The demo RL config on the transformers engine, its scripted judge client making one attempt per grade: one
    call gets HTTP 500, 8 others a reply without a score; 9 of the step's at most 16 judged grades fail, over the
    default bound (0.5). The step stops before training, naming the judge's URL, the failures by kind and the knob;
    no checkpoint or rollout is written."""
    import json

    from qed_lightning.rewards import JudgeFailuresError

    with pytest.raises(JudgeFailuresError) as failed:
        make_cli(args=[
            "--config", str(REPO / "configs/demo/rl.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.max_steps", "1", "--trainer.callbacks", "[]", "--trainer.limit_val_batches", "0",
            "--model.init_args.model_name_or_path", str(tiny_model_dir),
            "--model.init_args.engine", "qed_lightning.rollout.HFEngine",
            "--model.init_args.judge.init_args.cache_path", "null",
            "--model.init_args.judge.init_args.client.init_args.max_retries", "1",
            "--model.init_args.judge.init_args.client.init_args.faults", json.dumps(["http500"] + ["no_score"] * 8),
            "--data.init_args.path", str(REPO / "data/samples/fineproofs_rl.jsonl")])
    message = str(failed.value)
    assert re.search(r"^step 0: \d+ of \d+ judge grades failed \(\d+% > model\.judge\.init_args\.max_failure_fraction="
                     r"0\.5\) at the judge http://127\.0\.0\.1:\d+/v1 \(scripted-judge\[", message), message
    assert "): http_500 1, unparsable 8; last error:" in message
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("rollouts/*.jsonl"))
