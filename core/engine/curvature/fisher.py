"""Empirical/true Fisher curvature: block WoodFisher, its diagonal, and the identity (magnitude)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from core.engine.curvature.base import Curvature, FisherConfig, Progress, generator, layer_segments
from core.engine.curvature.inverse import DiagonalInverse, fisher_block_inverse
from core.engine.grads import fisher_gradients
from core.engine.layout import BlockLayout


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


def _samples(cfg: FisherConfig, model, layout, mask, data, progress):
    x, y = data
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
        dtype=mask.dtype,
        progress=progress,
    )


@dataclass
class WoodFisher:
    """Block-diagonal F = λI + GᵀG/m, inverted per block by Cholesky or Woodbury (see inverse.py)."""

    config: FisherConfig = field(default_factory=FisherConfig)
    block_size: int | None = 128
    taylor: bool = False  # also measure the mean gradient (WoodTaylor)

    def estimate(
        self, model: nn.Module, layout: BlockLayout, mask: Tensor, data, progress: Progress | None = None
    ) -> Curvature:
        s = _samples(self.config, model, layout, mask, data, progress)
        segments = layer_segments(
            layout, lambda layer: fisher_block_inverse(layer.blocks(s.grads).movedim(0, 1), self.config.lam)
        )
        return Curvature(segments, grad=s.mean if self.taylor else None)


@dataclass
class DiagonalFisher:
    """diag(F) = λ + mean(g²): saliency w²·F_qq/2, no cross-weight update."""

    config: FisherConfig = field(default_factory=FisherConfig)
    block_size: int | None = None

    def estimate(
        self, model: nn.Module, layout: BlockLayout, mask: Tensor, data, progress: Progress | None = None
    ) -> Curvature:
        s = _samples(self.config, model, layout, mask, data, progress)
        diag = s.grads.square().mean(dim=0).add_(self.config.lam)
        return Curvature(layer_segments(layout, lambda layer: DiagonalInverse(1.0 / layer.blocks(diag))))
