"""The rollout engine interface: what every generator (vLLM, transformers, a remote server pool) must provide.

An engine turns tokenized prompts into completions and reports, per completion, everything the RL loss needs:
the prompt and completion token ids, the sampler's log-prob of every sampled token (`logp_old` of SPEC 4, under
the *sampling temperature*, the same convention as the trainer's `token_logprobs(..., temperature)`), the finish
reason and the decoded text. Each completion carries the policy version of the weights that produced it, so the
trainer can measure (and bound) how off-policy a sample is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

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

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class RolloutEngine(ABC):
    """Generates completions and accepts new policy weights.

    Subclasses implement `generate` and `load_weights`; `sleep`/`wake_up` are optional memory hooks (vLLM on GPU
    releases its KV cache and weights while the optimizer runs).
    """

    policy_version: int = 0

    @abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, n: int = 1) -> list[list[Completion]]:
        """Sample `n` completions for each tokenized prompt; returns one list of `n` completions per prompt."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Replace the engine's weights with the given (HF parameter name, tensor) pairs."""

    def set_policy_version(self, version: int) -> None:
        self.policy_version = version

    def sleep(self) -> None:  # noqa: B027 - optional hook
        """Release memory while the trainer steps (no-op by default)."""

    def wake_up(self) -> None:  # noqa: B027 - optional hook
        """Undo `sleep` before the next generation (no-op by default)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the engine's resources."""

    def callbacks(self) -> list:
        """Lightning callbacks the engine needs next to the module's (e.g. `AsyncRollouts`' prefetch); none by default."""
        return []
