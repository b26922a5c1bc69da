"""Rollout engines (vLLM, transformers, a vLLM server pool, a pool started on this node) behind one lifecycle
(`RolloutEngine`), the overlap wrapper, the streaming layout, and the callbacks that drive them
(`WeightSyncCallback`, `FrozenEngineCallback`)."""

from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.rollout.callbacks import FrozenEngineCallback, WeightSyncCallback
from qed_lightning.rollout.engines.hf_engine import HFEngine
from qed_lightning.rollout.engines.local_pool import LocalVLLMPool
from qed_lightning.rollout.engines.server_engine import VLLMServerEngine
from qed_lightning.rollout.engines.vllm_engine import VLLMEngine
from qed_lightning.rollout.layouts.async_rollouts import AsyncRollouts
from qed_lightning.rollout.layouts.streaming import GroupStream, StepGroups
from qed_lightning.rollout.layouts.streaming_engine import StreamingRollouts

__all__ = ["AsyncRollouts", "Completion", "FrozenEngineCallback", "GroupStream", "HFEngine", "LocalVLLMPool", "RolloutEngine",
           "SamplingConfig", "StepGroups", "StreamingRollouts", "VLLMEngine", "VLLMServerEngine", "WeightSyncCallback"]
