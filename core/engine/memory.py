"""Memory plan: bytes of Fisher gradients and inverse blocks, computed before any work."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from core.engine.layout import BlockLayout
from core.engine.methods import Method, method_info
from core.errors import DoesNotFit


@dataclass
class MemoryPlan:
    block_size: int | None
    gradient_bytes: int
    inverse_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.gradient_bytes + self.inverse_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def plan(
    method: Method, shapes: dict[str, tuple[int, ...]], block_size: int | None, m: int, itemsize: int
) -> MemoryPlan:
    """The bytes the method's estimate holds for these weights, by the formula its table entry declares."""
    return MemoryPlan(block_size, *method_info(method).memory(BlockLayout(shapes, block_size), m, itemsize))


def fit(
    method: Method,
    shapes: dict[str, tuple[int, ...]],
    block_size: int | None,
    m: int,
    itemsize: int,
    budget_bytes: float | None,
    allow_shrink: bool,
) -> MemoryPlan:
    """The plan for the spec; with a budget, shrink the block size (if allowed) or refuse with numbers."""
    p = plan(method, shapes, block_size, m, itemsize)
    if budget_bytes is None or p.total_bytes <= budget_bytes:
        return p
    if allow_shrink and method_info(method).uses_blocks:
        c = block_size or max(math.prod(s) for s in shapes.values())
        while c > 1:
            c //= 2
            p = plan(method, shapes, c, m, itemsize)
            if p.total_bytes <= budget_bytes:
                return p
    raise DoesNotFit(
        f"the run needs {p.total_bytes / 2**20:.1f} MiB (gradients {p.gradient_bytes / 2**20:.1f} MiB, "
        f"inverse blocks {p.inverse_bytes / 2**20:.1f} MiB) but the budget is {budget_bytes / 2**20:.1f} MiB; "
        "lower fisher.samples or fisher.block_size, or set allow_block_shrink",
        errors=[{"loc": ["fisher"], "msg": "memory plan exceeds budget", "needed_bytes": p.total_bytes}],
    )
