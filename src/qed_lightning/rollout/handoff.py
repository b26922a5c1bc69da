"""The memory hand-off between training and generation when both share one accelerator (a colocated engine).

Training and a colocated vLLM engine take turns on the same GPU; at 4B scale each phase wants most of it:
1. after sampling, the engine sleeps (the module calls `engine.sleep()`): at vLLM's level 2 its weights and KV
   cache are discarded; the weights are replaced after the step anyway, so level 1's copy to host memory and back
   would be wasted;
2. the trainer steps;
3. the trainer gives back what it no longer needs (`free_training_memory`): gradients are freed
   (`zero_grad(set_to_none=True)`, on the module and on every optimizer) and PyTorch's caching allocator returns
   its free blocks to the driver (`empty_cache`). vLLM's sleep-mode allocator maps *physical* memory when it
   wakes; blocks that PyTorch's cache still holds (the training peak, 30-40 GB at 4B scale) are not physically
   free, and without this step the first wake-up runs out of memory;
4. the engine wakes in stages (`RolloutEngine.push_weights`): weights first (the memory the reload writes into),
   the new weights are loaded, then the KV cache.

`WeightSyncCallback` runs steps 3-4 after every optimizer step that pushes weights, for engines whose
`memory_handoff` is on (`VLLMEngine(enable_sleep_mode=True)`), and logs `memory/handoff` (1 when it ran),
`memory/freed_gib` (reserved memory returned to the driver), `memory/allocated_gib` and `memory/reserved_gib` (after),
`memory/device_free_gib` (the driver's free memory the engine can wake into) and `rollout/wake_s`.
On CPU there is no caching allocator and vLLM has no sleep mode: the same calls run, are counted, and the memory
figures are 0.

Where we differ from TRL's colocate mode (the same sequence): TRL frees the cache before waking only; we also free the
gradients first, which otherwise stay allocated until the next step's `zero_grad`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

GIB = float(2**30)


def device_memory() -> dict[str, float]:
    """Allocated and reserved memory of PyTorch's caching allocator, and the driver's free memory, in GiB (all 0 on
    CPU, which has no such allocator)."""
    if not torch.cuda.is_available():
        return {"allocated": 0.0, "reserved": 0.0, "device_free": 0.0}
    free, _ = torch.cuda.mem_get_info()
    return {"allocated": torch.cuda.memory_allocated() / GIB, "reserved": torch.cuda.memory_reserved() / GIB,
            "device_free": free / GIB}


def free_training_memory(module: torch.nn.Module, optimizers: Iterable) -> dict[str, float]:
    """Free the gradients of `module` and of every optimizer (DeepSpeed keeps its own), then return the caching
    allocator's free blocks to the driver. Returns the `memory/*` metrics of the module docstring."""
    before = device_memory()
    module.zero_grad(set_to_none=True)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    after = device_memory()
    return {"memory/handoff": 1.0, "memory/freed_gib": before["reserved"] - after["reserved"],
            "memory/allocated_gib": after["allocated"], "memory/reserved_gib": after["reserved"],
            "memory/device_free_gib": after["device_free"]}
