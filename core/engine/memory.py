"""Memory plan: the bytes a pruning step takes on top of the loaded model and data, computed before any work.

``gradient_bytes`` and ``inverse_bytes`` are what the method's estimate holds (``MethodInfo.memory``);
``working_bytes`` the rest of the step's peak (``MethodInfo.peak``): a vmap chunk of per-example gradients, the
Gram matrices while blocks are factored, eigensolver workspace, the Hessian's batches, the OBS step's vectors.
``total_bytes`` is the peak, what a budget is compared with.

For methods with a streamed path (WoodFisher, WoodTaylor) the plan also chooses the path, the chunk size k and,
when one chunk of every layer is too large, the layer groups, and says why (``reason``): *streamed* whenever some
block is dense (c ≤ m), its memory D·c + k·D instead of m·D; *buffered* when every block is a Woodbury one (c > m).
Under a budget, k is lowered first, then the layers are split into groups (one pass over the data each), then,
where allowed, the blocks shrink.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from core.engine.layout import BlockLayout
from core.engine.methods import Method, Sizing, chunk_elements, method_info
from core.errors import DoesNotFit

MiB = 2**20


@dataclass
class MemoryPlan:
    block_size: int | None
    gradient_bytes: int
    inverse_bytes: int
    working_bytes: int = 0
    path: str | None = None  # 'streamed' or 'buffered' for methods that have both; None otherwise
    chunk: int | None = None  # k: samples per chunk of per-example gradients
    groups: list[list[str]] | None = None  # layer groups, one pass over the data each (None: one pass)
    reason: str = ""  # why this path, chunk and grouping
    activations: int | None = None  # bytes per Fisher sample its forward saves for the backward (None: not known)

    @property
    def total_bytes(self) -> int:
        return self.gradient_bytes + self.inverse_bytes + self.working_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _streams(method: Method, layout: BlockLayout, m: int, path: str) -> bool:
    info = method_info(method)
    if info.streamed is None or path == "buffered":
        return False
    return path == "streamed" or any(layer.block <= m for layer in layout.layers)


def plan(
    method: Method,
    shapes: dict[str, tuple[int, ...]],
    block_size: int | None,
    m: int,
    itemsize: int,
    *,
    chunk: int = 64,
    joint: bool = False,
    path: str = "auto",
    groups: list[list[str]] | None = None,
    activations: int | None = None,
) -> MemoryPlan:
    """The bytes a pruning step of the method takes for these weights, by the formulas of its table entry; for a
    method with a streamed path, ``path`` 'auto' streams when some block is dense (c ≤ m). ``activations``: what
    the forward of one Fisher sample saves for the backward (:func:`core.engine.activations.saved_bytes_per_sample`;
    None: not known, not counted), held by every sample of a gradient chunk."""
    info = method_info(method)
    layout = BlockLayout(shapes, block_size)
    streamed = _streams(method, layout, m, path)
    memory, peak = info.streamed if streamed else (info.memory, info.peak)
    by_name = {layer.name: layer for layer in layout.layers}
    chunk_width = max(chunk_elements(by_name[n] for n in g) for g in groups) if streamed and groups else None
    gradient, inverse = memory(layout, m, itemsize)
    sizing = Sizing(m, itemsize, chunk, joint, chunk_width, activations or 0)
    total = peak(layout, sizing)
    p = MemoryPlan(block_size, gradient, inverse, max(0, total - gradient - inverse), activations=activations)
    if info.streamed is None:
        return p
    p.path, p.chunk = ("streamed" if streamed else "buffered"), min(chunk, m)
    p.groups = groups if streamed and groups and len(groups) > 1 else None
    p.reason = _reason(layout, m, itemsize, p)
    return p


def _reason(layout: BlockLayout, m: int, itemsize: int, p: MemoryPlan) -> str:
    dense = [layer for layer in layout.layers if layer.block <= m]
    buffer = m * layout.width * itemsize
    if p.path == "buffered":
        if not dense:
            return (
                f"buffered: every block is larger than m = {m} (c > m), so the Woodbury form needs the m × D "
                f"gradients ({buffer / MiB:.1f} MiB)"
            )
        return f"buffered: as asked (fisher.path); the m × D gradients take {buffer / MiB:.1f} MiB"
    why = (
        f"streamed: {len(dense)} of {len(layout.layers)} layers have dense blocks (c ≤ m = {m}), whose Gram matrices "
        f"are accumulated over chunks of k = {p.chunk} samples; the m × D gradients ({buffer / MiB:.1f} MiB) are "
        f"never held"
    )
    if len(dense) < len(layout.layers):
        why += f"; {len(layout.layers) - len(dense)} layer(s) with c > m keep their m × c rows (Woodbury form)"
    if p.groups:
        why += f"; the layers are differentiated in {len(p.groups)} groups, one pass over the data each"
    return why


def layer_groups(shapes: dict[str, tuple[int, ...]], n: int) -> list[list[str]]:
    """The layers, in order, cut into at most ``n`` contiguous groups of about equal numbers of weights."""
    sizes = {k: math.prod(v) for k, v in shapes.items()}
    target = sum(sizes.values()) / n
    groups: list[list[str]] = [[]]
    acc = 0
    for name, size in sizes.items():
        if groups[-1] and acc + size > target and len(groups) < n:
            groups.append([])
            acc = 0
        groups[-1].append(name)
        acc += size
    return groups


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
    path: str = "auto",
    activations: int | None = None,
) -> MemoryPlan:
    """The plan for the spec; with a budget, a streamed plan lowers its chunk size and then splits the layers into
    groups; then the block size shrinks (if allowed), or the job is refused with the numbers. ``budget_name`` says
    where the budget comes from (the spec's field or the server's setting)."""
    same = {"joint": joint, "path": path, "activations": activations}
    p = plan(method, shapes, block_size, m, itemsize, chunk=chunk, **same)
    if budget_bytes is None or p.total_bytes <= budget_bytes:
        return p
    if p.path == "streamed":
        k = p.chunk or chunk
        while k > 1:
            k //= 2
            q = plan(method, shapes, block_size, m, itemsize, chunk=k, **same)
            if q.total_bytes <= budget_bytes:
                q.reason += f"; k lowered from {min(chunk, m)} to fit the budget ({budget_name})"
                return q
        for n in range(2, len(shapes) + 1):
            groups = layer_groups(shapes, n)
            q = plan(method, shapes, block_size, m, itemsize, chunk=1, groups=groups, **same)
            if q.total_bytes <= budget_bytes:
                q.reason += f"; k = 1 and the layer groups to fit the budget ({budget_name})"
                return q
    if allow_shrink and method_info(method).uses_blocks:
        c = block_size or max(math.prod(s) for s in shapes.values())
        while c > 1:
            c //= 2
            p = plan(method, shapes, c, m, itemsize, chunk=chunk, **same)
            if p.total_bytes <= budget_bytes:
                p.reason += f"; blocks shrunk from {block_size or 'whole layers'} to {c} to fit the budget"
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
