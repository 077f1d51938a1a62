"""The streamed empirical Fisher: per-sample gradients folded, one chunk at a time, into per-block Gram matrices.

For blocks with c ≤ m the dense inverse needs only A_b = Σᵢ gᵢ,b gᵢ,bᵀ (c × c per block), never the m gradients
themselves. Each chunk of k per-sample gradients is added to the blocks by one batched GEMM per layer
(``A += Gᵀ G`` over the chunk's (nb, k, c) view), so the memory is D·c (the blocks) plus k·D (one chunk) instead
of m·D. Layers whose blocks are larger than m (the Woodbury form needs the m × c gradients) keep their gradients
in a per-layer buffer, optionally in bfloat16/float16. When even one chunk of all the layers is too large, the
layers are taken in groups, one pass over the same samples per group.

The mask is applied to the sums afterwards (A ⊙ ppᵀ and Σg ⊙ p, with p 0/1): the same numbers as masking each
gradient first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from core.engine.buffers import large_empty
from core.engine.grads import GradientChunks
from core.engine.layout import BlockLayout, LayerSlice
from core.engine.phases import phase


@dataclass
class StreamedFisher:
    """What one streamed pass leaves: Gram matrices of the dense layers, gradient rows of the others."""

    m: int
    grams: dict[str, Tensor] = field(default_factory=dict)  # (nb, c, c): Σ masked gᵢgᵢᵀ per block
    buffers: dict[str, Tensor] = field(default_factory=dict)  # (m, nb·c): masked gradient rows, padding zero
    total: Tensor | None = None  # (D,) Σᵢ masked gᵢ in layout order (the mean gradient × m), when asked for

    @property
    def mean(self) -> Tensor:
        """(D,) mean gradient over the m samples: WoodTaylor's first-order term."""
        if self.total is None:
            raise ValueError("the pass did not sum the gradients")
        return self.total / self.m


def add_gram(gram: Tensor, g: Tensor, layer: LayerSlice) -> None:
    """``gram`` (nb, c, c) += Σₖ over the chunk's gradients ``g`` (k, numel) cut into the layer's blocks: one batched
    GEMM for the full blocks, one GEMM for the zero-padded last block."""
    c, full = layer.block, layer.numel // layer.block
    if full:
        v = g[:, : full * c].unflatten(1, (full, c)).transpose(0, 1)  # (full, k, c), a view
        gram[:full].baddbmm_(v.mT, v)
    rest = layer.numel - full * c
    if rest:
        tail = g[:, full * c :]
        gram[full, :rest, :rest].addmm_(tail.mT, tail)


def stream_fisher(
    chunks: GradientChunks,
    layout: BlockLayout,
    mask: Tensor,
    *,
    dense: Callable[[LayerSlice], bool],
    groups: list[list[str]] | None = None,
    dtype: torch.dtype,
    buffer_dtype: torch.dtype | None = None,
    with_sum: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> StreamedFisher:
    """One pass over the m samples per group of layers (default: one group), folding every chunk into the Gram
    matrices of the ``dense`` layers (in ``dtype``) and the gradient rows of the others (in ``buffer_dtype``,
    default ``dtype``). ``progress(done, total)`` counts samples over all passes."""
    by_name = {layer.name: layer for layer in layout.layers}
    groups = groups or [layout.names]
    m, device = chunks.m, mask.device
    out = StreamedFisher(m)
    if with_sum:
        out.total = torch.zeros(layout.width, dtype=dtype, device=device)
    for layer in layout.layers:
        if dense(layer):
            out.grams[layer.name] = torch.zeros(layer.nb, layer.block, layer.block, dtype=dtype, device=device)
        else:
            buf = large_empty(m, layer.width, dtype=buffer_dtype or dtype, device=device)
            buf[:, layer.numel :] = 0
            out.buffers[layer.name] = buf
    total_work = m * len(groups)
    for p, names in enumerate(groups):
        for start, stop, grads in chunks(names):
            for name in names:
                layer = by_name[name]
                g = grads.pop(name).flatten(1)  # (k, numel); the chunk's memory goes as each layer is folded in
                if with_sum:
                    out.total[layer.offset : layer.offset + layer.numel] += g.sum(0).to(dtype)
                with phase("gram"):
                    if name in out.grams:
                        add_gram(out.grams[name], g.to(dtype), layer)
                    else:
                        out.buffers[name][start:stop, : layer.numel] = g
                del g
            del grads
            if progress:
                progress(p * m + stop, total_work)
    if not bool(mask.all()):
        for layer in layout.layers:
            p = layer.blocks(mask)  # (nb, c)
            if layer.name in out.grams:
                out.grams[layer.name].mul_(p.unsqueeze(-1).to(dtype)).mul_(p.unsqueeze(-2).to(dtype))
            else:
                out.buffers[layer.name].mul_(p.flatten().to(out.buffers[layer.name].dtype))
        if out.total is not None:
            out.total.mul_(mask.to(dtype))
    return out
