"""The memory plan of a structured WoodFisher prune (``structure`` with ``group_saliency == "fisher"``).

Families are pruned one at a time, each on its consumer's weights alone, so the step's peak is the largest consumer's:
the method's own estimate of that one weight (:func:`core.engine.memory.plan`: gradients or Gram matrices, the
inverse blocks, the streamed chunk) plus what the greedy removal holds on top (the blocks in float64, a downdate, the
candidates: :func:`core.engine.structured.fisher.held_bytes`). Block sizes: ``fisher.block_size`` c (at most the
layer), ``'layer'`` (one block per consumer: its D² entries are held explicitly), or ``'auto'``: one block per row
(c = the consumer's input columns, so each row's group is a small block), halved for every consumer together until the
plan fits the budget (the spec's/server's, else half the memory available now). A plan over the budget is refused
with the numbers (:class:`core.errors.DoesNotFit`); ``allow_block_shrink`` halves an explicit c as ``'auto'`` does.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from core.engine.memory import MemoryPlan, MiB, plan
from core.engine.structured.fisher import held_bytes
from core.errors import DoesNotFit
from core.runs.budget import AUTO_MEMORY_FRACTION, FittedPlan, available_memory_bytes, effective_budget_mb
from core.runs.spec import PruneSpec

__all__ = ["structured_fisher_plan"]


def _consumer_plan(spec: PruneSpec, name: str, shape: tuple[int, ...], units: int, block: int) -> MemoryPlan:
    rows, cols = shape[0], math.prod(shape[1:])
    itemsize = torch.finfo(torch.float64 if spec.dtype == "float64" else torch.float32).bits // 8
    m = spec.fisher_samples(None)
    p = plan(spec.method, {name: shape}, block, m, itemsize, chunk=spec.fisher.chunk, path=spec.fisher.path)
    p.working_bytes += held_bytes(rows, cols, units, block)
    return p


def _blocks(spec: PruneSpec, shapes: dict[str, tuple[int, ...]], cap: int | None) -> dict[str, int]:
    out = {}
    for name, shape in shapes.items():
        numel, cols = math.prod(shape), math.prod(shape[1:])
        c = spec.fisher.block_size
        base = numel if c == "layer" else cols if c == "auto" else min(int(c), numel)
        out[name] = min(base, cap) if cap else base
    return out


def structured_fisher_plan(
    spec: PruneSpec, consumers: dict[str, tuple[int, ...]], units: dict[str, int], server_mb: float | None = None
) -> tuple[FittedPlan, dict[str, MemoryPlan]]:
    """(the plan of the largest consumer, with how its blocks were chosen; every consumer weight's plan, whose
    ``block_size``, ``path`` and ``chunk`` its estimate takes). ``consumers``: the consumer weights' shapes;
    ``units``: each one's family's unit count."""
    budget_mb, source = effective_budget_mb(spec, server_mb)
    auto = spec.fisher.block_size == "auto"
    if budget_mb is None and auto:
        budget_mb = AUTO_MEMORY_FRACTION * available_memory_bytes() / MiB
        source = f"{AUTO_MEMORY_FRACTION:g} of this machine's memory available now, no budget being set"
    cap = None
    while True:
        blocks = _blocks(spec, consumers, cap)
        plans = {n: _consumer_plan(spec, n, s, units[n], blocks[n]) for n, s in consumers.items()}
        worst = max(plans.values(), key=lambda p: p.total_bytes)
        fits = budget_mb is None or worst.total_bytes <= budget_mb * MiB
        largest = max(blocks.values())
        if fits or not (auto or spec.allow_block_shrink) or largest <= 1:
            break
        cap = largest // 2
    how = "one block per row" if auto else f"fisher.block_size = {spec.fisher.block_size}"
    if cap:
        how += f", at most {cap} weights to fit the budget of {budget_mb:.0f} MiB ({source})"
    choice = f"structured woodfisher: {how}; per consumer " + ", ".join(f"{n}: c = {c}" for n, c in blocks.items())
    if not fits:
        raise DoesNotFit(
            f"the structured prune needs {worst.total_bytes / MiB:.1f} MiB for its largest consumer (the Fisher "
            f"estimate and the float64 blocks of the greedy removal) but the budget is {budget_mb:.1f} MiB ({source}); "
            "lower fisher.block_size or fisher.samples, or set allow_block_shrink",
            errors=[
                {
                    "loc": ["spec", "fisher"],
                    "msg": "memory plan exceeds budget",
                    "type": "memory_budget_exceeded",
                    "needed_bytes": worst.total_bytes,
                    "budget_bytes": int(budget_mb * MiB),
                    "budget": source,
                }
            ],
        )
    return FittedPlan(**asdict(worst), block_choice=choice), plans
