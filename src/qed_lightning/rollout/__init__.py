"""Rollout engines (vLLM, transformers) behind one interface, and the callback that keeps their weights current."""

from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.rollout.hf_engine import HFEngine
from qed_lightning.rollout.sync import WeightSyncCallback, iter_full_parameters
from qed_lightning.rollout.vllm_engine import VLLMEngine

__all__ = ["Completion", "HFEngine", "RolloutEngine", "SamplingConfig", "VLLMEngine", "WeightSyncCallback", "iter_full_parameters"]
