"""The rollout engine interface: what every generator (vLLM, transformers, a remote server pool) must provide.

An engine turns tokenized prompts into completions and reports, per completion, everything the RL loss needs:
the prompt and completion token ids, the sampler's log-prob of every sampled token (`logp_old` of SPEC 4, under
the *sampling temperature*, the same convention as the trainer's `token_logprobs(..., temperature)`), the finish
reason and the decoded text. Each completion carries the policy version of the weights that produced it, so the
trainer can measure (and bound) how off-policy a sample is.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings shared by every engine.

    Args:
        temperature: sampling temperature; the trainer divides its logits by the same value.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: top-k cut-off (-1 or 0 = off).
        max_new_tokens: completion budget; a completion that hits it has finish reason "length".
        seed: base seed for reproducible sampling (None = nondeterministic); prompt i uses `seed + i`.
        seeds: one seed per prompt, overriding `seed` (the RL modules seed by problem and step, so a problem gets
            the same samples whichever rank or batch position it lands on).
    """

    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    seed: int | None = None
    seeds: tuple[int, ...] | None = None

    def prompt_seed(self, i: int) -> int | None:
        """The seed of prompt i of a `generate` call."""
        if self.seeds is not None:
            return self.seeds[i]
        return None if self.seed is None else self.seed + i


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # sampler log-prob of each completion token, len == len(completion_ids)
    finish_reason: Literal["stop", "length"]
    text: str
    policy_version: int = 0
    extra: dict = field(default_factory=dict)
    # the weights' version when its last token was sampled, where an in-flight weight update may change them mid-sample
    # (vLLM's pause "keep"); None = the whole sample came from `policy_version`
    end_version: int | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class RolloutEngine(ABC):
    """Generates completions and accepts new policy weights; one lifecycle for every engine.

    The callbacks that own an engine (`rollout.sync`) drive it through these methods only:

    1. `start(model)` once training (or validation) starts: heavy set-up (load vLLM, connect to servers);
    2. `attach(policy, tokenizer)`: the trainer's policy module and tokenizer, for engines that read them;
    3. `generate(...)` each step; `sleep()` while the trainer steps (the module calls it after sampling);
    4. `push_weights(named_tensors, version)` after an optimizer step: wake the weights, load the new ones, wake
       the KV cache, record the version;
    5. `close()` at the end.

    Subclasses implement `generate` and `load_weights`; everything else has a no-op default. `max_model_len` is
    the longest prompt + completion the engine serves (None = no limit known), checked against the data before
    training. `in_process` and `streams_groups` are capabilities a stage module may branch on. `memory_handoff`
    says whether the engine shares the trainer's accelerator and hands memory back and forth with it (see
    `rollout.handoff`); `shares_policy` that it generates with the trained module itself.
    """

    policy_version: int = 0
    max_model_len: int | None = None
    #: while `generate` runs, called with (completions just finished, their tokens) so a progress display can follow
    #: a long generation; the RL module sets it around its call (None = nobody listens; an engine that cannot tell
    #: never calls it)
    progress: Callable[[int, int], None] | None = None

    @property
    def memory_handoff(self) -> bool:
        """True when the trainer should free its gradients and allocator cache before this engine wakes."""
        return False

    @property
    def shares_policy(self) -> bool:
        """True when the engine generates with the policy module being trained (nothing to push)."""
        return False

    @property
    def in_process(self) -> bool:
        """True when the engine runs vLLM inside this process (one per process: a second one, or another thread's
        call, cannot share it); wrappers answer for the engine they wrap."""
        return False

    @property
    def streams_groups(self) -> bool:
        """True when the engine forms the training steps itself from a stream of graded groups (`group_stream`)."""
        return False

    @property
    def sleep_discards_weights(self) -> bool:
        """True when `sleep` drops the weights, which then must be pushed after every optimizer step."""
        return False

    @property
    def sleeping(self) -> frozenset[str]:
        """The memory kinds ("weights", "kv_cache") that `sleep` released and no `wake_up` has mapped again; empty
        while awake (always, for an engine that never sleeps)."""
        return frozenset()

    def start(self, model: str | None = None) -> None:  # noqa: B027 - optional hook
        """Heavy set-up, once, when training or validation starts; `model` is the policy's `model_name_or_path`
        (or a frozen engine's own model). Idempotent."""

    def attach(self, policy: torch.nn.Module, tokenizer) -> None:  # noqa: B027 - optional hook
        """Receive the trainer's policy module and tokenizer (after `start`)."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, n: int = 1) -> list[list[Completion]]:
        """Sample `n` completions for each tokenized prompt; returns one list of `n` completions per prompt."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Replace the engine's weights with the given (HF parameter name, tensor) pairs."""

    def push_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> dict[str, float]:
        """Wake the weights, load `named_tensors`, wake the KV cache, and mark the weights `version`. Returns the
        seconds spent waking (`wake_s`) and loading (`load_s`). Every rank calls it (a sharded trainer gathers each
        parameter collectively while the pairs are read)."""
        started = time.perf_counter()
        self.wake_up(("weights",))
        woke = time.perf_counter()
        self.load_weights(named_tensors)
        loaded = time.perf_counter()
        self.wake_up(("kv_cache",))
        self.set_policy_version(version)
        return {"wake_s": (woke - started) + (time.perf_counter() - loaded), "load_s": loaded - woke}

    def set_policy_version(self, version: int) -> None:
        self.policy_version = version

    @property
    def serving_version(self) -> int:
        """The version of the weights generation runs on now: `policy_version`, except for an engine that loads
        pushed weights in the background (`LocalVLLMPool`), where `policy_version` is the newest pushed (the same
        on every rank) and this one follows the loads."""
        return self.policy_version

    def use_run_dir(self, path: Path) -> None:  # noqa: B027 - optional hook
        """The run's folder (`trainer.default_root_dir`), told before `start`: an engine that writes temporary files
        (pushed weights, server logs) keeps them there."""

    def check_alive(self, stalled_s: float | None = None) -> None:
        """Raise one error naming what failed if the engine cannot make progress (a dead server, a failed weight
        load); with `stalled_s`, the caller has seen nothing come back for that long: raise a TimeoutError saying
        what the engine waits on. Cheap enough to call every few seconds."""
        if stalled_s is not None:
            raise TimeoutError(f"{type(self).__name__} produced nothing for {stalled_s:.0f} s "
                               f"(weight version {self.serving_version})")

    def sleep(self) -> None:  # noqa: B027 - optional hook
        """Release accelerator memory while the trainer steps (no-op by default)."""

    def wake_up(self, tags: tuple[str, ...] | None = None) -> None:  # noqa: B027 - optional hook
        """Undo `sleep` for the given memory kinds ("weights", "kv_cache"; None = all) before they are used."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the engine's resources."""

    def callbacks(self) -> list:
        """Lightning callbacks the engine needs next to the module's (e.g. `AsyncRollouts`' prefetch); none by
        default."""
        return []

    def group_stream(self):
        """The engine's stream of complete, graded groups when it forms the training steps itself (the one-node
        asynchronous layout, `rollout.streaming.StreamingRollouts`); None: the module samples its own batch."""
        return None


class WrappingEngine(RolloutEngine):
    """An engine that adds behaviour around another (`AsyncRollouts`' prefetch, `StreamingRollouts`' group stream):
    the lifecycle, weights and version pass through to `self.engine`; `sleep` is a no-op, since a wrapper's
    generator keeps working while the trainer steps. Subclasses override what they change."""

    def __init__(self, engine: RolloutEngine, max_lag: int = 1) -> None:
        if max_lag < 0:
            raise ValueError(f"model.engine.init_args.max_lag must be >= 0, got {max_lag}")
        self.engine, self.max_lag = engine, max_lag

    @property
    def policy_version(self) -> int:  # type: ignore[override]
        return self.engine.policy_version

    def set_policy_version(self, version: int) -> None:
        self.engine.set_policy_version(version)

    @property
    def serving_version(self) -> int:
        return self.engine.serving_version

    def use_run_dir(self, path: Path) -> None:
        self.engine.use_run_dir(path)

    def check_alive(self, stalled_s: float | None = None) -> None:
        self.engine.check_alive(stalled_s)

    @property
    def max_model_len(self) -> int | None:  # type: ignore[override]
        return self.engine.max_model_len

    @property
    def in_process(self) -> bool:
        return self.engine.in_process

    def start(self, model: str | None = None) -> None:
        self.engine.start(model)

    def attach(self, policy, tokenizer) -> None:
        self.engine.attach(policy, tokenizer)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, n: int = 1) -> list[list[Completion]]:
        return self.engine.generate(prompts, sampling, n)

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self.engine.load_weights(named_tensors)

    def push_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> dict[str, float]:
        return self.engine.push_weights(named_tensors, version)

    def sleep(self) -> None:
        """No-op: the wrapped generator keeps working while the trainer steps."""

    def wake_up(self, tags: tuple[str, ...] | None = None) -> None:
        self.engine.wake_up(tags)

    def close(self) -> None:
        self.engine.close()
