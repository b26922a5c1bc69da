"""The RL step's phases through a real fit (tiny model, HF engine, scripted judge over HTTP): a listener on
`module.phases` sees generate, grade and train in order, the train phase's total is the step's micro-batch count and
it advances once per micro-batch; the logged `time/*_s` metrics are the phases' times."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from qed_lightning.data import ProofRLDataModule
from qed_lightning.modules import RubricRLModule
from qed_lightning.rewards import RubricJudge
from qed_lightning.rollout import HFEngine
from qed_lightning.testing import ScriptedJudgeClient
from runs import read_metrics, series

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def phase_started(self, name, total):
        self.events.append(("started", name))

    def phase_advanced(self, name, completed, total):
        self.events.append(("advanced", name, completed, total))

    def phase_ended(self, name, seconds):
        self.events.append(("ended", name))


def test_rl_step_runs_named_phases_with_micro_batch_progress(tiny_model_dir, tmp_path):
    judge = RubricJudge(ScriptedJudgeClient(rule="char_fraction", charset="aeiou"), require_think_close=False)
    # a budget of 48 tokens: the step's 8 sequences (~40-tokens prompts + 8 new tokens) need several micro-batches
    module = RubricRLModule(str(tiny_model_dir), engine=HFEngine(), judge=judge, group_size=4, max_new_tokens=8,
                            micro_batch_tokens=48, micro_batch_layout="padded", export_hf=False,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    recorder = Recorder()
    module.phases.listeners.append(recorder)
    data = ProofRLDataModule(str(REPO / "data/samples/fineproofs_rl.jsonl"), tokenizer=str(tiny_model_dir),
                             prompts_per_step=2, val_size=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, default_root_dir=tmp_path, enable_progress_bar=False,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="csv"), enable_checkpointing=False,
                        log_every_n_steps=1)
    try:
        trainer.fit(module, datamodule=data)
    finally:
        judge.close()
    rows = read_metrics(tmp_path)
    micro = series(rows, "train/micro_batches")
    assert len(micro) == 2 and min(micro) > 1
    for step in range(2):
        start = [i for i, e in enumerate(recorder.events) if e == ("started", "generate")][step]
        names = [e[1] for e in recorder.events[start:] if e[0] == "started"][:3]
        assert names == ["generate", "grade", "train"]
        train = recorder.events[recorder.events.index(("started", "train"), start):]
        train = train[: train.index(("ended", "train")) + 1]
        n = int(micro[step])
        # the total is announced (completed 0), then one advance per micro-batch
        assert [e for e in train if e[0] == "advanced"] == [("advanced", "train", k, n) for k in range(n + 1)]
    for name in ("generate", "grade", "train"):
        assert len(series(rows, f"time/{name}_s")) == 2 and min(series(rows, f"time/{name}_s")) > 0
