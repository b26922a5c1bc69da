"""Rollout engines (vLLM, transformers, a vLLM server pool) behind one lifecycle (`RolloutEngine`), the overlap
wrapper, and the callbacks that drive them (`WeightSyncCallback`, `FrozenEngineCallback`)."""

from qed_lightning.rollout.async_rollouts import AsyncRollouts
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.rollout.hf_engine import HFEngine
from qed_lightning.rollout.server_engine import VLLMServerEngine
from qed_lightning.rollout.sync import FrozenEngineCallback, WeightSyncCallback, iter_full_parameters
from qed_lightning.rollout.vllm_engine import VLLMEngine

__all__ = ["AsyncRollouts", "Completion", "FrozenEngineCallback", "HFEngine", "RolloutEngine", "SamplingConfig", "VLLMEngine", "VLLMServerEngine",
           "WeightSyncCallback", "iter_full_parameters"]
