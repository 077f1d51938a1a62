"""Memory plan: the bytes a pruning step takes on top of the loaded model and data, computed before any work.

``gradient_bytes`` and ``inverse_bytes`` are what the method's estimate holds (``MethodInfo.memory``);
``working_bytes`` the rest of the step's peak (``MethodInfo.peak``): a vmap chunk of per-example gradients, the
Gram matrices while blocks are factored, eigensolver workspace, the Hessian's batches, the OBS step's vectors.
``total_bytes`` is the peak, what a budget is compared with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from core.engine.layout import BlockLayout
from core.engine.methods import Method, Sizing, method_info
from core.errors import DoesNotFit

MiB = 2**20


@dataclass
class MemoryPlan:
    block_size: int | None
    gradient_bytes: int
    inverse_bytes: int
    working_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.gradient_bytes + self.inverse_bytes + self.working_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def plan(
    method: Method,
    shapes: dict[str, tuple[int, ...]],
    block_size: int | None,
    m: int,
    itemsize: int,
    *,
    chunk: int = 64,
    joint: bool = False,
) -> MemoryPlan:
    """The bytes a pruning step of the method takes for these weights, by the formulas of its table entry."""
    info = method_info(method)
    layout = BlockLayout(shapes, block_size)
    gradient, inverse = info.memory(layout, m, itemsize)
    peak = info.peak(layout, Sizing(m=m, itemsize=itemsize, chunk=chunk, joint=joint))
    return MemoryPlan(block_size, gradient, inverse, max(0, peak - gradient - inverse))


def fit(
    method: Method,
    shapes: dict[str, tuple[int, ...]],
    block_size: int | None,
    m: int,
    itemsize: int,
    budget_bytes: float | None,
    allow_shrink: bool,
    *,
    chunk: int = 64,
    joint: bool = False,
    budget_name: str = "memory_budget_mb",
) -> MemoryPlan:
    """The plan for the spec; with a budget, shrink the block size (if allowed) or refuse with the numbers.
    ``budget_name`` says where the budget comes from (the spec's field or the server's setting)."""
    p = plan(method, shapes, block_size, m, itemsize, chunk=chunk, joint=joint)
    if budget_bytes is None or p.total_bytes <= budget_bytes:
        return p
    if allow_shrink and method_info(method).uses_blocks:
        c = block_size or max(math.prod(s) for s in shapes.values())
        while c > 1:
            c //= 2
            p = plan(method, shapes, c, m, itemsize, chunk=chunk, joint=joint)
            if p.total_bytes <= budget_bytes:
                return p
    hint = "lower fisher.samples or fisher.block_size, or set allow_block_shrink"
    if not method_info(method).uses_blocks:
        hint = "lower fisher.samples, prune fewer layers (layers.include/exclude) or use a block method (woodfisher)"
    raise DoesNotFit(
        f"the run needs {p.total_bytes / MiB:.1f} MiB (gradients {p.gradient_bytes / MiB:.1f} MiB, inverse blocks "
        f"{p.inverse_bytes / MiB:.1f} MiB, working memory {p.working_bytes / MiB:.1f} MiB) but the budget is "
        f"{budget_bytes / MiB:.1f} MiB ({budget_name}); {hint}",
        errors=[
            {
                "loc": ["spec", "fisher"],
                "msg": "memory plan exceeds budget",
                "type": "memory_budget_exceeded",
                "needed_bytes": p.total_bytes,
                "budget_bytes": int(budget_bytes),
                "budget": budget_name,
            }
        ],
    )
