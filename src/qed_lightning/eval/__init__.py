"""Evaluation (SPEC 6): `qed-eval` and the pieces it is made of.

- `benchmarks`: IMO-ProofBench, ProofBench and rubric benchmarks (FineProofs-RL-test) from a hub id or a local file;
- `scaffolds`: direct generation, the reasoning cache, generate-verify-refine; each reports its tokens per problem;
- `metrics`: `ProofScore` and `JudgeAgreement` (torchmetrics), shared with the RL validation callback;
- `store`: resumable bookkeeping (append-and-flush JSONL, keyed by problem id, sample index and scaffold);
- `report`: summary JSON, rich table, score-distribution plot;
- `runner`: `Evaluator`; `agreement`: judge-vs-human agreement; `callback`: `ProofBenchEvalCallback`;
- `cli`: the `qed-eval` command.
"""

from qed_lightning.eval.benchmarks import Benchmark, EvalProblem, IMOProofBench, ProofBench, RubricBenchmark
from qed_lightning.eval.callback import ProofBenchEvalCallback
from qed_lightning.eval.metrics import JudgeAgreement, ProofScore
from qed_lightning.eval.runner import Evaluator
from qed_lightning.eval.scaffolds import (
    DirectScaffold,
    GenerateVerifyRefine,
    ReasoningCacheScaffold,
    Scaffold,
    ScaffoldOutput,
)

__all__ = [
    "Benchmark",
    "DirectScaffold",
    "EvalProblem",
    "Evaluator",
    "GenerateVerifyRefine",
    "IMOProofBench",
    "JudgeAgreement",
    "ProofBench",
    "ProofBenchEvalCallback",
    "ProofScore",
    "ReasoningCacheScaffold",
    "RubricBenchmark",
    "Scaffold",
    "ScaffoldOutput",
]
