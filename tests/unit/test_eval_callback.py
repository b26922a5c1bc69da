"""`ProofBenchEvalCallback` on a fake module: when it evaluates, what it logs, and that the engine gets fresh weights
(from the weight-sync callback that owns it, never from the evaluation callback itself)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fakes import FakeEngine, FakeJudgeClient, FakeTokenizer

from qed_lightning.eval import IMOProofBench, ProofBenchEvalCallback
from qed_lightning.rewards import ProofBenchJudge
from qed_lightning.rollout import WeightSyncCallback


class FakeModule:
    """What the callback uses of an RL module: engine, tokenizer, model, judge and `log`."""

    def __init__(self, engine, tokenizer, judge=None) -> None:
        self.engine, self.tokenizer, self.judge = engine, tokenizer, judge
        self.model = torch.nn.Linear(2, 2)
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: float, **kwargs) -> None:
        self.logged[name] = value

    def log_dict(self, values: dict[str, float], **kwargs) -> None:
        self.logged.update(values)


def _reply(text: str):
    # PB-Basic-001 closes its thinking (judge: 7), PB-Basic-002 never does (no proof: 0, no judge call, truncated)
    if "composite" in text:
        return "<think>t</think>Factor it. QED.", 30, "stop"
    return "<think>still thinking", 50, "length"


def test_callback_evaluates_every_n_steps_and_logs_val_metrics(samples_dir):
    tok = FakeTokenizer()
    engine = FakeEngine(tok, _reply)
    client = FakeJudgeClient(lambda prompt: "Complete. <points>7 out of 7</points>")
    callback = ProofBenchEvalCallback(IMOProofBench(str(samples_dir / "imo_proofbench.jsonl"), limit=2),
                                      judge=ProofBenchJudge(client), every_n_steps=2, n=2, max_new_tokens=64)
    module = FakeModule(engine, tok)
    owner = WeightSyncCallback(engine)  # the module's weight-sync callback, which runs after ours in the same hook
    trainer = SimpleNamespace(global_step=0, global_rank=0, world_size=1, callbacks=[callback, owner], optimizers=[])
    callback.setup(trainer, module, "fit")
    for step in (0, 1, 3):  # no evaluation at step 0 or off the interval
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, 0)
    assert engine.calls == [] and module.logged == {}

    trainer.global_step = 2
    callback.on_train_batch_end(trainer, module, None, None, 0)
    callback.on_train_batch_end(trainer, module, None, None, 1)  # same optimizer step: not twice
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 4  # 2 problems x n=2 in one batched call
    assert engine.loaded == 1 and engine.policy_version == 2  # the step's weights were pushed first, by their owner
    assert owner.syncs == 1 and module.logged["rollout/policy_version"] == 2
    owner.on_train_batch_end(trainer, module, None, None, 1)
    assert engine.loaded == 1  # the owner does not push the same step twice
    logged = module.logged
    # scores [7, 7, 0, 0] -> 14/28 = 50%; runs: (7+0)/2 each -> std 0; best of 2: (7 + 0)/2 -> 50%
    assert logged["val/proofbench_score_pct"] == pytest.approx(50.0)
    assert logged["val/proofbench_std_pct"] == 0.0 and logged["val/proofbench_best_of_n_pct"] == pytest.approx(50.0)
    assert logged["val/proofbench_truncation_rate"] == 0.5 and logged["val/proofbench_no_proof_rate"] == 0.5
    assert logged["val/proofbench_failure_rate"] == 0.0
    assert logged["val/proofbench_tokens_mean"] == pytest.approx(40.0)  # (30 + 30 + 50 + 50) / 4
    assert len(client.prompts) == 2  # the two proofs; the unfinished rollouts were never sent to the judge


def test_callback_uses_the_module_judge_by_default_and_shards_over_ranks(samples_dir):
    tok = FakeTokenizer()
    engine = FakeEngine(tok, _reply)
    client = FakeJudgeClient(lambda prompt: "<points>6 out of 7</points>")
    module = FakeModule(engine, tok, judge=ProofBenchJudge(client))
    callback = ProofBenchEvalCallback(IMOProofBench(str(samples_dir / "imo_proofbench.jsonl"), limit=2),
                                      every_n_steps=1)
    callback.setup(None, module, "fit")
    engine.policy_version = 5
    values = callback.evaluate(module, step=5, rank=1, world_size=2)  # rank 1 of 2 gets the second problem only
    assert engine.loaded == 0  # the engine already held this step's weights
    assert engine.calls and all("composite" not in text for text in engine.calls[0])
    assert values["score_pct"] == 0.0 and values["no_proof_rate"] == 1.0 and client.prompts == []
