"""Empirical/true Fisher curvature: block WoodFisher, its diagonal, and the identity (magnitude)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from core.engine.buffers import map_large_allocations
from core.engine.curvature.base import (
    Curvature,
    FisherConfig,
    Progress,
    effective_lambdas,
    generator,
    layer_segments,
    live_counts,
)
from core.engine.curvature.hessian import release_free_memory
from core.engine.curvature.inverse import DiagonalInverse, Segment, fisher_block_inverse, gram_block_inverse
from core.engine.curvature.streaming import stream_fisher
from core.engine.grads import GradientChunks, fisher_gradients
from core.engine.layout import BlockLayout
from core.engine.phases import phase


@dataclass
class Identity:
    """F⁻¹ = I: OBS then reduces to magnitude pruning with no weight update."""

    block_size: int | None = None

    def estimate(
        self, model: nn.Module, layout: BlockLayout, mask: Tensor, data, progress: Progress | None = None
    ) -> Curvature:
        dtype = mask.dtype
        return Curvature(
            layer_segments(
                layout,
                lambda layer: DiagonalInverse(torch.ones(layer.nb, layer.block, dtype=dtype, device=mask.device)),
            )
        )


def _chunks(cfg: FisherConfig, model, data) -> GradientChunks:
    x, y = data
    return GradientChunks(
        model,
        x,
        y,
        m=cfg.m,
        fisher_batch=cfg.fisher_batch,
        loss=cfg.loss,
        true_fisher=cfg.true_fisher,
        generator=generator(cfg.seed),
        chunk=cfg.chunk,
    )


def _samples(cfg: FisherConfig, model, layout, mask, data, progress):
    x, y = data
    with phase("gradients"):
        return fisher_gradients(
            model,
            layout,
            x,
            y,
            m=cfg.m,
            fisher_batch=cfg.fisher_batch,
            loss=cfg.loss,
            true_fisher=cfg.true_fisher,
            mask=mask,
            generator=generator(cfg.seed),
            chunk=cfg.chunk,
            dtype=cfg.buffer_dtype or mask.dtype,
            progress=progress,
        )


def streams(cfg: FisherConfig, layout: BlockLayout) -> bool:
    """Whether WoodFisher streams: ``cfg.path`` 'streamed' or 'buffered', or for 'auto' (the memory plan decides the
    job's path, :mod:`core.engine.memory`) when some layer's blocks are dense (c ≤ m)."""
    if cfg.path == "auto":
        return any(layer.block <= cfg.m for layer in layout.layers)
    return cfg.path == "streamed"


@dataclass
class WoodFisher:
    """Block-diagonal F = λI + GᵀG/m, inverted per block by Cholesky or Woodbury (see inverse.py).

    Two paths to the same numbers (``FisherConfig.path``): *buffered* holds the m × D gradients and forms each
    block's Gram matrix from them; *streamed* folds the gradients, a chunk at a time, into the Gram matrices of the
    dense blocks (c ≤ m) and keeps gradient rows only for the Woodbury ones (c > m), see ``streaming.py``.
    """

    config: FisherConfig = field(default_factory=FisherConfig)
    block_size: int | None = 128
    taylor: bool = False  # also measure the mean gradient (WoodTaylor)

    def estimate(
        self, model: nn.Module, layout: BlockLayout, mask: Tensor, data, progress: Progress | None = None
    ) -> Curvature:
        cfg = self.config
        if not streams(cfg, layout):
            s = _samples(cfg, model, layout, mask, data, progress)
            sums = {
                layer.name: _square_sum(s.grads[:, layer.offset : layer.offset + layer.numel]) / cfg.m
                for layer in layout.layers
            }
            lams = effective_lambdas(cfg, sums, live_counts(layout, mask))
            with phase("inverse"):
                segments = layer_segments(
                    layout, lambda layer: _woodbury_or_dense(layer.blocks(s.grads), lams[layer.name], mask)
                )
            grad = s.mean.to(mask.dtype) if self.taylor else None
            return Curvature(segments, grad=grad, info={"path": "buffered"}, lambdas=lams)
        release_free_memory()  # what earlier work (the evaluation's batches) left resident on the heap
        map_large_allocations()  # freed chunks and slices leave the process, so its peak is the plan's sum
        with phase("gradients"):
            sf = stream_fisher(
                _chunks(cfg, model, data),
                layout,
                mask,
                dense=lambda layer: layer.block <= cfg.m,
                groups=cfg.groups,
                dtype=mask.dtype,
                buffer_dtype=cfg.buffer_dtype,
                with_sum=self.taylor,
                progress=progress,
            )
        release_free_memory()  # what the chunks' smaller temporaries left on the heap, before the blocks' work
        sums = {n: float(a.diagonal(dim1=-2, dim2=-1).sum()) / cfg.m for n, a in sf.grams.items()}
        sums.update({n: _square_sum(rows) / cfg.m for n, rows in sf.buffers.items()})
        lams = effective_lambdas(cfg, sums, live_counts(layout, mask))
        with phase("inverse"):
            segments = []
            for layer in layout.layers:
                if layer.name in sf.grams:
                    inv = gram_block_inverse(sf.grams.pop(layer.name), cfg.m, lams[layer.name])
                else:
                    rows = sf.buffers.pop(layer.name)  # (m, nb·c): this layer's own buffer
                    inv = _woodbury_or_dense(rows.unflatten(-1, (layer.nb, layer.block)), lams[layer.name], mask)
                segments.append(Segment(layer.offset, inv))
        return Curvature(segments, grad=sf.mean if self.taylor else None, info={"path": "streamed"}, lambdas=lams)


def _square_sum(g: Tensor) -> float:
    """Σ g² over a block of gradient rows, accumulated in float64 without a squared copy (mean diag F̂ × m·live)."""
    return float(torch.linalg.vector_norm(g, dtype=torch.float64).square())


def _woodbury_or_dense(g: Tensor, lam: float, mask: Tensor):
    """The inverse of one layer's blocks from its gradient rows ``g`` (m, nb, c), cast to the run's dtype (a
    bfloat16/float16 buffer is widened one layer at a time)."""
    return fisher_block_inverse(g.movedim(0, 1).to(mask.dtype), lam)


@dataclass
class DiagonalFisher:
    """diag(F) = λ + mean(g²): saliency w²·F_qq/2, no cross-weight update."""

    config: FisherConfig = field(default_factory=FisherConfig)
    block_size: int | None = None

    def estimate(
        self, model: nn.Module, layout: BlockLayout, mask: Tensor, data, progress: Progress | None = None
    ) -> Curvature:
        cfg = self.config
        s = _samples(cfg, model, layout, mask, data, progress)
        with phase("inverse"):
            diag = s.grads.square().mean(dim=0, dtype=mask.dtype)
            sums = {layer.name: float(diag[layer.offset : layer.offset + layer.numel].sum()) for layer in layout.layers}
            lams = effective_lambdas(cfg, sums, live_counts(layout, mask))
            for layer in layout.layers:
                diag[layer.offset : layer.offset + layer.width] += lams[layer.name]
        segments = layer_segments(layout, lambda layer: DiagonalInverse(1.0 / layer.blocks(diag)))
        return Curvature(segments, lambdas=lams)
