"""Test-only components a `qed-fit` subprocess loads by class path (its PYTHONPATH holds this folder): a callback
that records, per rank, how the module's rollout engine was created and driven, and a judge client that is slow on
one rank."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from qed_lightning.testing import ScriptedJudgeClient


class EngineProbe(Callback):
    """At the end of training, write `<default_root_dir>/engine-rank<R>.json`: this process's engine launch (vLLM
    executor, ranks), the vLLM worker's own rank settings, and the engine's sleep/wake counts."""

    def on_train_end(self, trainer, pl_module) -> None:
        engine = pl_module.engine
        executor = engine.llm.llm_engine.model_executor
        worker = executor.driver_worker.worker
        record = {
            "trainer_rank": trainer.global_rank, "pid": os.getpid(), "llm_id": id(engine.llm),
            "backend": engine.launch.backend, "launch_rank": engine.launch.ranks.rank,
            "launch_world": engine.launch.ranks.world_size, "tp_group": list(engine.launch.tp_group),
            "executor": type(executor).__name__, "worker_rank": worker.rank, "worker_local_rank": worker.local_rank,
            "handoff_counts": engine.handoff_counts, "policy_version": engine.policy_version,
        }
        Path(trainer.default_root_dir, f"engine-rank{trainer.global_rank}.json").write_text(json.dumps(record))


class SlowRankJudgeClient(ScriptedJudgeClient):
    """A scripted judge that answers every call `delay_s` late on training rank `rank` (its server is overloaded)."""

    def __init__(self, rank: int = 1, delay_s: float = 60.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.slow_rank, self.slow_delay_s = rank, delay_s

    async def complete(self, prompt: str) -> str:
        import asyncio

        from qed_lightning.parallel.distributed import rank

        if rank() == self.slow_rank:
            await asyncio.sleep(self.slow_delay_s)
        return await super().complete(prompt)
