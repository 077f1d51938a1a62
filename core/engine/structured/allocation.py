"""Global allocation: how many units each family loses when one fraction of *all* units is removed.

Each family's greedy removals come with a comparable cost each (:func:`core.engine.structured.prune.removal_curves`:
the Fisher saliency as a predicted loss increase; OBS-H's relative output error; L2 over the family's mean).
:func:`allocate` takes the cheapest removals over all families, a family's removals in their greedy order (its
costs are made non-decreasing by a running maximum, so no later removal is taken before an earlier one), and keeps
at least one unit in every family.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["allocate", "global_total"]


def global_total(units: Sequence[int], fraction: float) -> int:
    """round(fraction × all units), at most all units less one per family."""
    return min(sum(units) - len(units), max(0, round(fraction * sum(units))))


def allocate(curves: Sequence[Sequence[float]], units: Sequence[int], fraction: float) -> list[int]:
    """Units to remove per family: the :func:`global_total` cheapest removals of ``curves`` (per family, the cost
    of each greedy removal in turn; at most ``units − 1`` of them are used)."""
    if len(curves) != len(units):
        raise ValueError("one curve per family")
    pool = []
    for f, (curve, n) in enumerate(zip(curves, units, strict=True)):
        running = float("-inf")
        for k, cost in enumerate(list(curve)[: n - 1]):
            running = max(running, float(cost))
            pool.append((running, k, f))
    total = global_total(units, fraction)
    if total > len(pool):
        raise ValueError(f"{total} removals asked for, the curves hold {len(pool)}")
    counts = [0] * len(units)
    for _cost, _k, f in sorted(pool)[:total]:
        counts[f] += 1
    return counts
