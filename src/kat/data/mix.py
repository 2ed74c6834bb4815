"""``data=mix``: several sources with weights, resampled to target shares per domain, level and mode.

The paper's mixes differ per stage (34.8 % think-on in stage 1, ≈ 2:1 on:off in stage 2, RL data biased
to hard levels); ``data.shares`` states such targets and :func:`mix` draws a training set that meets
them. Algorithm: every item starts with weight ``source.weight / len(source)`` (so sources contribute
by weight, not by size); for every axis with a target, weights are raked (iterative proportional
fitting, a few rounds) until each value's weight share equals its target; then ``size`` items are
drawn with replacement, seeded. The realised shares are returned for logging.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Mapping, Sequence

AXES = ("domain", "level", "mode")


def _value(item: dict, axis: str):
    v = item.get(axis)
    return str(v) if v is not None else "none"


def shares(items: Sequence[dict], axis: str) -> dict[str, float]:
    """Share of each value of ``axis`` among ``items`` (``"none"`` for a missing field)."""
    c = Counter(_value(it, axis) for it in items)
    n = max(1, len(items))
    return {k: c[k] / n for k in sorted(c)}


def mix(
    sources: Sequence[tuple[str, Sequence[dict], float]],
    *,
    size: int,
    targets: Mapping[str, Mapping | None] | None,
    seed: int,
    rounds: int = 20,
) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Draw ``size`` items from weighted ``sources`` (``(name, items, weight)``) meeting ``targets``.

    ``targets`` maps an axis (domain, level, mode) to ``{value: share}`` or None (as the sources give).
    Returns the drawn items and their realised shares per axis.
    """
    if size <= 0:
        raise ValueError(f"data.size must be positive, got {size}")
    pool: list[dict] = []
    weights: list[float] = []
    for name, items, weight in sources:
        if weight < 0:
            raise ValueError(f"data.sources[{name}].weight must be >= 0, got {weight}")
        if not items:
            raise ValueError(f"data.sources[{name}] is empty")
        pool.extend(items)
        weights.extend([weight / len(items)] * len(items))
    if sum(weights) <= 0:
        raise ValueError("data.sources: all weights are zero")

    targets = {k: v for k, v in (targets or {}).items() if v}
    for axis, target in targets.items():
        if axis not in AXES:
            raise ValueError(f"data.shares.{axis}: unknown axis (known: {', '.join(AXES)})")
        total = sum(float(x) for x in target.values())
        if total <= 0:
            raise ValueError(f"data.shares.{axis}: shares must sum to a positive number")
        present = {_value(it, axis) for it in pool}
        for value, share in target.items():
            if float(share) > 0 and str(value) not in present:
                raise ValueError(f"data.shares.{axis}.{value}: no source item has {axis}={value}")

    for _ in range(rounds if targets else 0):
        for axis, target in targets.items():
            total = sum(float(x) for x in target.values())
            want = {str(k): float(v) / total for k, v in target.items()}
            mass: Counter = Counter()
            for it, w in zip(pool, weights):
                mass[_value(it, axis)] += w
            all_mass = sum(mass.values())
            for i, it in enumerate(pool):
                v = _value(it, axis)
                weights[i] = weights[i] * want.get(v, 0.0) * all_mass / mass[v] if mass[v] > 0 else 0.0

    rng = random.Random(f"kat-mix/{seed}")
    drawn = rng.choices(pool, weights=weights, k=size)
    drawn = [dict(it, id=f"{it['id']}#{k}") for k, it in enumerate(drawn)]
    realised = {axis: shares(drawn, axis) for axis in AXES}
    return drawn, realised
