"""One way to derive a sampling seed from a base seed and the keys that identify a random stream.

Every seeded generation (an RL step's rollouts of one problem, a reasoning-cache state, a cycle of the RC loop, a
summary, an evaluation sample) needs a seed of its own that is the same whichever rank, batch position or resume
produces it, and different from every other stream. Arithmetic offsets (`seed + 100_003 * step + 7_919 * index`)
collide: step 0 of problem 100_003 and step 7_919 of problem 0 share a seed, and offsets chosen independently for
cycles, replays and repeats can add up to the same number. A hash of the keys has no structure to collide on:
`derive_seed` is
BLAKE2b over the base seed and the keys' `repr`s, cut to 62 bits (well inside what torch generators and vLLM's
per-request seeds accept).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qed_lightning.rollout.base import SamplingConfig

__all__ = ["SEED_BITS", "derive_sampling", "derive_seed"]

SEED_BITS = 62


def derive_seed(base: int, *keys: object) -> int:
    """A seed in [0, 2**62) determined by `base` and `keys` (ints, strings, bools, None, tuples of these).

    Keys are told apart by type and position, so `(1, "1")`, `(1, 2)` and `(12,)` give three different streams.

    >>> derive_seed(0, "step", 3, "problem", 7) == derive_seed(0, "step", 3, "problem", 7)
    True
    >>> len({derive_seed(0, s, p) for s in range(50) for p in range(50)})  # no two (step, problem) pairs share one
    2500
    >>> derive_seed(0, 1, 2) != derive_seed(0, 12) and derive_seed(0, 1) != derive_seed(0, "1")
    True
    """
    text = repr((int(base), *keys)).encode("utf-8")
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)


def derive_sampling(sampling: SamplingConfig, *keys: object, indices: Sequence[int] | None = None) -> SamplingConfig:
    """`sampling` for a new random stream: each prompt's seed `s` (its entry of `seeds`, or `seed + i`, the engines'
    convention) becomes `derive_seed(s, *keys)`. `indices` picks the prompts of a call that covers only some of them
    (a scaffold's second round); unseeded sampling stays unseeded.

    >>> from qed_lightning.rollout.base import SamplingConfig
    >>> base = SamplingConfig(seeds=(5, 9, 11))
    >>> derive_sampling(base, "cycle", 1, indices=[2]).seeds == (derive_seed(11, "cycle", 1),)
    True
    >>> derive_sampling(SamplingConfig(seed=5), "x").seeds == (derive_seed(5, "x"),)  # one prompt by default
    True
    >>> derive_sampling(SamplingConfig(), "x").seeds is None
    True
    """
    if sampling.seed is None and sampling.seeds is None:
        return sampling
    if indices is None:
        indices = range(len(sampling.seeds)) if sampling.seeds is not None else [0]
    seeds = tuple(derive_seed(sampling.prompt_seed(i), *keys) for i in indices)
    return replace(sampling, seed=None, seeds=seeds)
