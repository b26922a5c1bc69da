"""The contract between a stage module and the rollout layouts that call back into it.

A layout that generates ahead of the trainer (the streaming layout's `GroupStream`) asks the module for its
prompts, sampling settings and grades from its own threads; a callback that pushes weights times itself in the
module's step phases. `RolloutHost` writes down what they may ask; `check_host` checks a module against it once, when
the layout binds to it, and names every missing member. `RubricRLModule` (and so `ReasoningCacheRLModule`)
implements it; a user's module that plugs into a layout implements these members and nothing else.

The training loader's side is `PeekableLoader`: a loader that can tell the next step's batch without consuming it
(`ProofRLDataModule`'s), which `AsyncRollouts` uses to prefetch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from qed_lightning.data.records import ProofProblem
    from qed_lightning.metrics import StepPhases
    from qed_lightning.rollout.base import Completion, SamplingConfig

__all__ = ["HOST_MEMBERS", "PeekableLoader", "RolloutHost", "check_host"]


@runtime_checkable
class RolloutHost(Protocol):
    """What a rollout layout may call on the stage module that owns its engine."""

    #: the step's named, timed phases (weight pushes run in a "sync" phase)
    phases: StepPhases

    @property
    def group_size(self) -> int:
        """Rollouts per prompt (G)."""

    def sampling(self, problems: list[ProofProblem], step: int | None = None) -> SamplingConfig:
        """The sampling settings for `problems` at `step` (seeds derived from each problem)."""

    def stream_prompts(self, problem: ProofProblem, release: int) -> list[ProofProblem]:
        """The GRPO prompts a streamed problem becomes (called from the stream's threads)."""

    def grade_rollouts(self, problems: list[ProofProblem],
                       rollouts: list[Completion]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Rewards `[N]`, a validity mask `[N]` and the grades of `rollouts` (G per problem, in order)."""


HOST_MEMBERS = ("phases", "group_size", "sampling", "stream_prompts", "grade_rollouts")


def check_host(module: object, layout: str) -> RolloutHost:
    """`module` as a `RolloutHost`, or a `TypeError` that names `layout` and every member `module` lacks."""
    missing = [name for name in HOST_MEMBERS if not hasattr(module, name)]
    if missing:
        raise TypeError(f"{layout} calls back into its stage module, but {type(module).__name__} lacks "
                        f"{', '.join(missing)} (the RolloutHost contract, qed_lightning.rollout.host); use "
                        "RubricRLModule or ReasoningCacheRLModule, or implement those members")
    return module  # type: ignore[return-value]


@runtime_checkable
class PeekableLoader(Protocol):
    """A training loader that can tell its next batch without consuming it (None at the end of a pass)."""

    def peek(self) -> list | None: ...
