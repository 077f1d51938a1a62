"""A spec's memory plan against its budget: the lower of the spec's ``memory_budget_mb`` and the server's
``ARBORIST_MEMORY_BUDGET_MB`` (either may be unset). Checked at job creation (on the architecture built on the
``meta`` device, :mod:`core.runs.preflight`) and again by the run on the real model (:class:`core.runs.run.Run`).

``fisher.block_size = 'auto'`` (the default) is decided here: whole-layer blocks where their plan fits the budget
(bench/defaults.py: MLP / LeNet-5 at 90 % 0.950 / 0.956 whole-layer against 0.934 / 0.944 with c = 128), else the
largest block size that fits (halving from the largest layer); the plan says which and why (``block_choice``)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from core.engine.memory import MemoryPlan, MiB, fit, plan
from core.engine.methods import method_info
from core.errors import InvalidInput
from core.runs.spec import PruneSpec, Update

SERVER_BUDGET = "the server's ARBORIST_MEMORY_BUDGET_MB"
#: ``block_size = 'auto'`` with no budget set: whole layers only while their plan fits this share of the machine
AUTO_MEMORY_FRACTION = 0.5
SPEC_BUDGET = "spec.memory_budget_mb"


@dataclass
class FittedPlan(MemoryPlan):
    """A plan and how its block size was chosen (shown in the report's ``memory_plan``)."""

    block_choice: str | None = None


#: where a container's memory limit is read (cgroup v2, then v1); absent or 'max' means no limit
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


#: where the memory other processes leave is read (``MemAvailable``)
MEMINFO = "/proc/meminfo"


def machine_memory_bytes() -> int:
    """The memory this process may use (bytes): the machine's physical memory, or its container's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_LIMITS:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def available_memory_bytes() -> int:
    """The memory this process may still take (bytes): the kernel's ``MemAvailable`` (what other processes leave),
    at most :func:`machine_memory_bytes`; that alone where /proc/meminfo is missing."""
    machine = machine_memory_bytes()
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(machine, int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return machine


def effective_budget_mb(spec: PruneSpec, server_mb: float | None) -> tuple[float | None, str]:
    """(the budget in MiB, or None without one; where it comes from)."""
    if spec.memory_budget_mb is None or (server_mb is not None and server_mb < spec.memory_budget_mb):
        return server_mb, SERVER_BUDGET
    return spec.memory_budget_mb, SPEC_BUDGET


def memory_plan(
    spec: PruneSpec,
    shapes: dict[str, tuple[int, ...]],
    server_mb: float | None = None,
    activations: int | None = None,
) -> FittedPlan:
    """The plan of a pruning step of ``spec`` over the weights ``shapes``, fitted to the effective budget (blocks
    shrunk if the spec allows it; with ``block_size = 'auto'``, whole layers or the largest block size that fits);
    :class:`core.errors.DoesNotFit` with the numbers when it cannot fit, and :class:`core.errors.InvalidInput` for
    more weights than the method takes. ``activations``: the bytes one Fisher sample's forward saves for the
    backward (:func:`core.engine.activations.saved_bytes_per_sample`), held k times by a gradient chunk."""
    info = method_info(spec.method)
    width = sum(torch.Size(s).numel() for s in shapes.values())
    if info.max_weights is not None and width > info.max_weights:
        raise InvalidInput(
            f"{spec.method.value} is for tiny models: {width} weights selected, at most {info.max_weights}; "
            "select fewer layers (layers.include/exclude) or use woodfisher",
            errors=[{"loc": ["spec", "method"], "msg": f"at most {info.max_weights} weights", "type": "value_error"}],
        )
    budget_mb, source = effective_budget_mb(spec, server_mb)
    budget = budget_mb * MiB if budget_mb is not None else None
    args = (spec.method, shapes)
    sizing = (
        spec.fisher_samples(None),
        torch.finfo(torch.float64 if spec.dtype == "float64" else torch.float32).bits // 8,
    )
    kw = {
        "chunk": spec.fisher.chunk,
        "joint": spec.fisher.update is Update.JOINT,
        "path": spec.fisher.path,
        "activations": activations,
    }
    if spec.fisher.block_size != "auto" or not info.uses_blocks:
        p = fit(*args, spec.block_size, *sizing, budget, spec.allow_block_shrink, **kw, budget_name=source)
        chosen = None
        if info.uses_blocks:
            chosen = f"fisher.block_size = {spec.fisher.block_size}"
            if p.block_size != spec.block_size:
                chosen += f", shrunk to {p.block_size} to fit the budget of {budget_mb:g} MiB ({source})"
        return FittedPlan(**asdict(p), block_choice=chosen)
    whole = plan(*args, None, *sizing, **kw)
    if budget is None:  # 'auto' never plans past this machine: half the memory it has free stands in for the budget
        # (free, not installed: on a machine shared with other jobs and services, half of all of it was an OOM kill)
        budget = AUTO_MEMORY_FRACTION * available_memory_bytes()
        budget_mb, source = (
            budget / MiB,
            (f"{AUTO_MEMORY_FRACTION:g} of this machine's memory available now, no budget being set"),
        )
    if whole.total_bytes <= budget:
        return FittedPlan(
            **asdict(whole),
            block_choice=f"auto: whole layers, {whole.total_bytes / MiB:.1f} MiB, "
            f"within the budget of {budget_mb:.0f} MiB ({source})",
        )
    p = fit(*args, None, *sizing, budget, True, **kw, budget_name=source)  # DoesNotFit when no block size fits
    if p.block_size is None:  # whole layers still, with a smaller gradient chunk (the streamed path)
        chosen = f"auto: whole layers, gradient chunk {p.chunk}, to fit the budget of {budget_mb:.0f} MiB ({source})"
    else:
        chosen = (
            f"auto: blocks of {p.block_size}, the largest that fits the budget of {budget_mb:.0f} MiB ({source}); "
            f"whole layers need {whole.total_bytes / MiB:.1f} MiB"
        )
    return FittedPlan(**asdict(p), block_choice=chosen)
