"""`ProofBenchEvalCallback`: a small proof benchmark evaluated during RL, with the same metric code as `qed-eval`.

Every `every_n_steps` optimizer steps it samples the benchmark's problems with the module's own rollout engine
(`pl_module.engine`, policy prompt, direct generation), grades them with its judge (default: the module's), and
logs `val/<name>_score_pct`, `_std_pct`, `_best_of_n_pct`, `_failure_rate`, `_truncation_rate`, `_no_proof_rate`
and `_tokens_mean` through `pl_module.log`. It never pushes weights itself: Lightning runs it before the module's
`WeightSyncCallback` in the same hook, so it asks that owner for this step's push first (the owner's hand-off and
logging included; the owner then skips the step).
Under DDP each rank samples its share of the problems and `ProofScore` gathers the results across ranks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from qed_lightning.data.chat import POLICY_PROMPT
from qed_lightning.eval.benchmarks import Benchmark, EvalProblem
from qed_lightning.eval.metrics import ProofScore
from qed_lightning.eval.scaffolds import DirectScaffold
from qed_lightning.rewards.judge import BaseJudge
from qed_lightning.rollout.base import SamplingConfig
from qed_lightning.rollout.callbacks import WeightSyncCallback
from qed_lightning.seeds import derive_seed

__all__ = ["ProofBenchEvalCallback"]

log = logging.getLogger(__name__)


class ProofBenchEvalCallback(Callback):
    """Evaluate on a small benchmark every `every_n_steps` optimizer steps (see the module docstring).

    Args:
        benchmark: e.g. `IMOProofBench` with `limit: 8` (loaded and validated in `setup`, before training).
        judge: the benchmark's judge; None = the module's `judge` (which must suit the benchmark).
        every_n_steps: optimizer steps between evaluations.
        n: samples per problem.
        temperature, top_p, max_new_tokens: sampling.
        name: metric prefix, `val/<name>_*`.
        prompt_template: the policy prompt.
        seed: sampling seed base; each sample's seed is derived from it, the step, the problem and the run.
    """

    def __init__(self, benchmark: Benchmark, judge: BaseJudge | None = None, every_n_steps: int = 50, n: int = 1,
                 temperature: float = 0.8, top_p: float = 1.0, max_new_tokens: int = 49152, name: str = "proofbench",
                 prompt_template: str = POLICY_PROMPT, seed: int = 0) -> None:
        if every_n_steps < 1 or n < 1:
            raise ValueError(f"ProofBenchEvalCallback: every_n_steps and n must be >= 1, got {every_n_steps} and {n}.")
        self.benchmark, self.judge, self.every_n_steps, self.n = benchmark, judge, every_n_steps, n
        self.sampling = SamplingConfig(temperature, top_p, -1, max_new_tokens, seed)
        self.name, self.scaffold = name, DirectScaffold(prompt_template=prompt_template)
        self.problems: list[EvalProblem] = []
        self._last_step = -1

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.problems:
            self.problems = self.benchmark.load()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        # this step's weights, by their owner
        WeightSyncCallback.owner(trainer, pl_module.engine).push(trainer, pl_module)
        for key, value in self.evaluate(pl_module, step, trainer.global_rank, trainer.world_size).items():
            pl_module.log(f"val/{self.name}_{key}", value, on_step=True, on_epoch=False, batch_size=1)

    def evaluate(self, pl_module: L.LightningModule, step: int, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        """Sample, grade and score this rank's share of the problems (with the engine's current weights); the metric
        gathers every rank's samples."""
        engine, judge = pl_module.engine, self.judge or pl_module.judge
        indices = [i for i in range(len(self.problems)) for _ in range(self.n)][rank::world_size]  # [P * n / ranks]
        runs = [k for _ in self.problems for k in range(self.n)][rank::world_size]
        problems = [self.problems[i] for i in indices]
        seeds = tuple(derive_seed(self.sampling.seed, "eval", self.name, step, p.problem_id, k)
                      for p, k in zip(problems, runs))
        sampling = replace(self.sampling, seed=None, seeds=seeds)
        outputs = self.scaffold.run([p.problem for p in problems], engine, pl_module.tokenizer, sampling)
        grades = judge.grade([p.grade_request(o.response) for p, o in zip(problems, outputs)])
        metric = ProofScore(judge.on_failure)
        metric.update(
            scores=torch.tensor([math.nan if g.score is None else float(g.score) for g in grades]),
            problem=torch.tensor(indices), run=torch.tensor(runs),
            truncated=torch.tensor([o.truncated for o in outputs]),
            no_proof=torch.tensor([g.status == "truncated" for g in grades]),
            tokens=torch.tensor([float(o.tokens) for o in outputs]),
        )
        values = {key: float(value) for key, value in metric.compute().items() if key not in ("n", "problems", "runs")}
        log.info("step %d: %s score %.1f%% over %d samples", step, self.name, values["score_pct"], len(grades))
        return values
