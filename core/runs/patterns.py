"""A spec's mask pattern against the model: refused before any work when a layer cannot follow it, and checked on
every pruned layer's final mask for the report."""

from __future__ import annotations

from torch import Tensor

from core.engine.patterns import Pattern
from core.errors import InvalidInput
from core.runs.spec import PruneSpec


def check_pattern(spec: PruneSpec, shapes: dict[str, tuple[int, ...]]) -> None:
    """:class:`InvalidInput` (422) naming the layers whose weight the spec's pattern cannot tile."""
    pattern = Pattern.parse(spec.pattern)
    bad = {n: why for n, s in shapes.items() if (why := pattern.fits(tuple(s)))}
    if bad:
        listed = "; ".join(f"{n}: {why}" for n, why in list(bad.items())[:5])
        raise InvalidInput(
            f"pattern {pattern} does not fit {len(bad)} selected layer(s) ({listed}); keep them dense "
            "(layers.exclude) or choose another pattern",
            errors=[{"loc": ["spec", "pattern"], "msg": f"does not fit {n}", "type": "value_error"} for n in bad],
        )


def pattern_report(spec: PruneSpec, masks: dict[str, Tensor]) -> dict:
    """{"pattern", "holds": every pruned layer's mask follows it, "layers_checked"}."""
    pattern = Pattern.parse(spec.pattern)
    return {
        "pattern": str(pattern),
        "holds": all(pattern.holds(m) for m in masks.values()),
        "layers_checked": len(masks),
    }
