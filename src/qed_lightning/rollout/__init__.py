"""Rollout engines behind one lifecycle (`RolloutEngine`), the layouts that schedule them, and the callbacks that
drive them (`WeightSyncCallback`, `FrozenEngineCallback`).

Which to pick (docs/scaling.md has the numbers):
- one process or one node, colocated (the default): `VLLMEngine` (in-process vLLM, sleeps while the trainer steps);
  `HFEngine` where vLLM cannot run (tests, a debugger);
- generation on other GPUs of the node, overlapped with training: `LocalVLLMPool` (this job starts the servers)
  under `StreamingRollouts` (`configs/layout/one_node_async.yaml`: groups stream in and are graded as they come);
- servers started elsewhere (other nodes, `scripts/slurm/vllm_pool.sbatch`): `VLLMServerEngine`, under
  `StreamingRollouts` or `AsyncRollouts` (`configs/layout/pipeline_rl.yaml`: the next batch prefetched whole).
"""

from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.rollout.callbacks import FrozenEngineCallback, WeightSyncCallback
from qed_lightning.rollout.engines.hf_engine import HFEngine
from qed_lightning.rollout.engines.local_pool import LocalVLLMPool
from qed_lightning.rollout.engines.server_engine import VLLMServerEngine
from qed_lightning.rollout.engines.vllm_engine import VLLMEngine
from qed_lightning.rollout.layouts.async_rollouts import AsyncRollouts
from qed_lightning.rollout.layouts.streaming import GroupStream, StepGroups
from qed_lightning.rollout.layouts.streaming_engine import StreamingRollouts

__all__ = ["AsyncRollouts", "Completion", "FrozenEngineCallback", "GroupStream", "HFEngine", "LocalVLLMPool",
           "RolloutEngine", "SamplingConfig", "StepGroups", "StreamingRollouts", "VLLMEngine", "VLLMServerEngine",
           "WeightSyncCallback"]
