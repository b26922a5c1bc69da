"""Extra reward terms without subclassing: plain functions named by dotted path, weighted, added to the judge's reward.

    model:
      init_args:
        reward_terms:
          - {fn: my_terms.length_penalty, weight: -0.1}          # logged as reward/length_penalty
          - {fn: my_terms.has_qed, weight: 0.05, name: qed}      # logged as reward/qed

A term is a function `fn(problems, rollouts) -> list[float]` (`RewardTermFn`): `problems[i]` is the problem of
`rollouts[i]` (a `ProofProblem`: statement, rubric, source...), `rollouts[i]` a `Completion` (`text`,
`completion_ids`, `truncated`, ...); it returns one value per rollout. The reward of rollout i is then
`judge_reward[i] + sum_k weight_k * term_k[i]`, before the overlong penalty and the group advantage. A grade that
failed and is dropped (`judge.on_failure: drop`) stays dropped. The validation pass reports the judge's reward alone.
Each term's mean over the step's rollouts (unweighted) is logged as `reward/<name>` (`name` defaults to the
function's name). `qed-fit` puts the current directory on `sys.path`, so `my_terms.py` beside the config imports.

A path that does not import, a name that is not callable, or a term that returns the wrong number of values is a
`ConfigError` naming `model.reward_terms[k]`.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from qed_lightning.data.loading import ConfigError
from qed_lightning.data.records import ProofProblem
from qed_lightning.rollout.base import Completion

__all__ = ["RewardTerm", "RewardTermFn", "RewardTerms"]


class RewardTermFn(Protocol):
    """`fn(problems, rollouts)`: one float per rollout; `problems[i]` is the problem `rollouts[i]` answers."""

    def __call__(self, problems: Sequence[ProofProblem], rollouts: Sequence[Completion]) -> Sequence[float]: ...


@dataclass
class RewardTerm:
    """One extra reward term.

    Args:
        fn: dotted path of the function, e.g. `my_terms.length_penalty` (a module in the current directory works).
        weight: its weight in the reward (negative for a penalty).
        name: the name it is logged under, `reward/<name>` (default: the function's name).
    """

    fn: str
    weight: float = 1.0
    name: str | None = None


def _resolve(path: str, key: str) -> Callable:
    module, _, attr = path.rpartition(".")
    if not module:
        raise ConfigError(f"{key}.fn: {path!r} is not a dotted path (module.function), e.g. my_terms.length_penalty")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise ConfigError(f"{key}.fn: cannot import module {module!r} for {path!r} ({err}); a module in the "
                          "current directory or on PYTHONPATH") from None
    except AttributeError:
        raise ConfigError(f"{key}.fn: module {module!r} has no {attr!r}") from None
    if not callable(fn):
        raise ConfigError(f"{key}.fn: {path!r} is not callable")
    return fn


class RewardTerms:
    """The configured terms, resolved at construction (errors at the door), and the step's per-term sums for
    `pop_metrics` (the stream layout grades in threads, hence the lock)."""

    def __init__(self, terms: Sequence[RewardTerm | dict] | None, key: str = "model.reward_terms") -> None:
        self.terms: list[tuple[str, float, Callable]] = []
        self.key = key
        for k, term in enumerate(terms or []):
            term = term if isinstance(term, RewardTerm) else RewardTerm(**term)
            fn = _resolve(term.fn, f"{key}[{k}]")
            self.terms.append((term.name or term.fn.rpartition(".")[2], float(term.weight), fn))
        names = [name for name, _, _ in self.terms]
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}: two terms are logged under the same name ({names}); set `name:` on one")
        self._sums: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.terms)

    def values(self, problems: Sequence[ProofProblem], rollouts: Sequence[Completion]) -> list[float]:
        """The weighted sum of the terms per rollout (`problems[i]` is `rollouts[i]`'s problem), `[N]`."""
        total = [0.0] * len(rollouts)
        for k, (name, weight, fn) in enumerate(self.terms):
            values = [float(v) for v in fn(problems, rollouts)]
            if len(values) != len(rollouts) or not all(math.isfinite(v) for v in values):
                raise ConfigError(f"{self.key}[{k}] ({name}): must return one finite number per rollout "
                                  f"({len(rollouts)}), returned {len(values)} values")
            with self._lock:
                acc = self._sums.setdefault(name, [0.0, 0.0])
                acc[0] += sum(values)
                acc[1] += len(values)
            total = [t + weight * v for t, v in zip(total, values)]
        return total

    def pop_metrics(self) -> dict[str, float]:
        """`reward/<name>`: each term's mean (unweighted) since the last pop."""
        with self._lock:
            sums, self._sums = self._sums, {}
        return {f"reward/{name}": s / max(n, 1.0) for name, (s, n) in sums.items()}
