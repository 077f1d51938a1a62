"""A spec's memory plan against its budget: the lower of the spec's ``memory_budget_mb`` and the server's
``ARBORIST_MEMORY_BUDGET_MB`` (either may be unset). Checked at job creation (on the architecture built on the
``meta`` device, :mod:`core.runs.preflight`) and again by the run on the real model (:class:`core.runs.run.Run`)."""

from __future__ import annotations

import torch

from core.engine.memory import MemoryPlan, fit
from core.engine.methods import method_info
from core.errors import InvalidInput
from core.runs.spec import PruneSpec, Update

SERVER_BUDGET = "the server's ARBORIST_MEMORY_BUDGET_MB"
SPEC_BUDGET = "spec.memory_budget_mb"


def effective_budget_mb(spec: PruneSpec, server_mb: float | None) -> tuple[float | None, str]:
    """(the budget in MiB, or None without one; where it comes from)."""
    if spec.memory_budget_mb is None or (server_mb is not None and server_mb < spec.memory_budget_mb):
        return server_mb, SERVER_BUDGET
    return spec.memory_budget_mb, SPEC_BUDGET


def memory_plan(spec: PruneSpec, shapes: dict[str, tuple[int, ...]], server_mb: float | None = None) -> MemoryPlan:
    """The plan of a pruning step of ``spec`` over the weights ``shapes``, fitted to the effective budget (blocks
    shrunk if the spec allows it); :class:`core.errors.DoesNotFit` with the numbers when it cannot fit, and
    :class:`core.errors.InvalidInput` for more weights than the method takes."""
    info = method_info(spec.method)
    width = sum(torch.Size(s).numel() for s in shapes.values())
    if info.max_weights is not None and width > info.max_weights:
        raise InvalidInput(
            f"{spec.method.value} is for tiny models: {width} weights selected, at most {info.max_weights}; "
            "select fewer layers (layers.include/exclude) or use woodfisher",
            errors=[{"loc": ["spec", "method"], "msg": f"at most {info.max_weights} weights", "type": "value_error"}],
        )
    budget_mb, source = effective_budget_mb(spec, server_mb)
    return fit(
        spec.method,
        shapes,
        spec.block_size,
        spec.fisher_samples(None),
        torch.finfo(torch.float64 if spec.dtype == "float64" else torch.float32).bits // 8,
        budget_mb * 2**20 if budget_mb is not None else None,
        spec.allow_block_shrink,
        chunk=spec.fisher.chunk,
        joint=spec.fisher.update is Update.JOINT,
        budget_name=source,
        path=spec.fisher.path,
    )
