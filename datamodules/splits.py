"""Seeded, reproducible splits of sample lists.

Every draw uses its own generator seeded from (seed, purpose, domain), so changing one split never
changes another and each domain gets its own permutation.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def rng_for(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(name.encode()) for name in names)])


def permuted(items: Sequence[T], seed: int, *names: str) -> list[T]:
    order = rng_for(seed, *names).permutation(len(items))
    return [items[i] for i in order]


def hold_out(items: Sequence[T], fraction: float, seed: int, *names: str) -> tuple[list[T], list[T]]:
    """Split off ``round(fraction * n)`` items (at least one if fraction > 0); returns (kept, held)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"hold-out fraction must be in [0, 1), got {fraction}")
    count = max(1, round(fraction * len(items))) if fraction > 0 else 0
    if count >= len(items):
        raise ValueError(f"holding out {fraction:.0%} of {len(items)} {'/'.join(names)} images leaves none to keep")
    shuffled = permuted(items, seed, *names)
    return shuffled[count:], shuffled[:count]


def stratified_split(items: Sequence[T], key, val_fraction: float, test_fraction: float, seed: int,
                     *names: str) -> tuple[list[T], list[T], list[T]]:
    """Split into (train, val, test) with the same fractions inside every ``key(item)`` group."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 "
                         "and sum to less than 1")
    groups: dict[str, list[T]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    train, val, test = [], [], []
    for group_name in sorted(groups):
        shuffled = permuted(groups[group_name], seed, *names, group_name)
        n_test = round(test_fraction * len(shuffled))
        n_val = round(val_fraction * len(shuffled))
        test += shuffled[:n_test]
        val += shuffled[n_test:n_test + n_val]
        train += shuffled[n_test + n_val:]
    return train, val, test


def draw_shots(pool: Sequence[T], shots: int, fold: int, num_folds: int, seed: int, *names: str) -> list[T]:
    """``shots`` items for cross-validation fold ``fold``: the pool is permuted once by seed and cut into
    ``num_folds`` disjoint chunks; fold f takes the first ``shots`` items of chunk f."""
    if shots < 1:
        raise ValueError(f"target_shots must be >= 1, got {shots}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, num_folds={num_folds}), got {fold}")
    if shots > len(pool):
        raise ValueError(f"target_shots={shots} exceeds the {len(pool)} target normals available in "
                         f"{'/'.join(names)} (train normals minus the validation hold-out)")
    if shots * num_folds > len(pool):
        raise ValueError(
            f"target_shots={shots} x num_folds={num_folds} needs {shots * num_folds} disjoint target normals but "
            f"only {len(pool)} are available in {'/'.join(names)}"
        )
    chunk = len(pool) // num_folds
    shuffled = permuted(pool, seed, "shots", *names)
    return shuffled[fold * chunk: fold * chunk + shots]


def draw_fraction(pool: Sequence[T], fraction: float, seed: int, *names: str) -> list[T]:
    """A seeded ``fraction`` of the pool (at least one item)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return permuted(pool, seed, "fraction", *names)[: max(1, round(fraction * len(pool)))]
