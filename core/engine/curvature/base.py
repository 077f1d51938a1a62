"""The curvature-estimator interface every pruning method plugs into."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from core.engine.curvature.inverse import Segment
from core.engine.grads import Loss
from core.engine.layout import BlockLayout

Progress = Callable[[int, int], None]


@dataclass
class FisherConfig:
    """How Fisher samples are drawn: m samples of ``fisher_batch`` examples, dampening λ."""

    m: int = 256
    fisher_batch: int = 1
    lam: float = 1e-5
    true_fisher: bool = False
    loss: Loss = Loss.CROSS_ENTROPY
    chunk: int = 64  # k: samples per vmap chunk
    seed: int = 0
    #: WoodFisher's path: 'streamed' (Gram matrices of the dense blocks accumulated per chunk: D·c + k·D memory),
    #: 'buffered' (the m × D gradients held), or 'auto' (streamed when some block is dense, c ≤ m)
    path: str = "auto"
    #: layer groups the streamed path differentiates in turn, one pass over the samples each (None: all at once)
    groups: list[list[str]] | None = None
    #: dtype of the held gradients (buffered path, or Woodbury layers): bfloat16/float16 halve it; None: the run's
    buffer_dtype: torch.dtype | None = None
    #: how ``lam`` is read: 'absolute' (λ itself), 'relative' (λ = lam × the mean diagonal of the estimate F̂ over
    #: the live weights of all layers) or 'relative_layer' (the same per layer); see :func:`effective_lambdas`
    lam_scale: str = "absolute"


LAM_SCALES = ("absolute", "relative", "relative_layer")


def effective_lambdas(cfg: FisherConfig, diag_sums: dict[str, float], live: dict[str, float]) -> dict[str, float]:
    """λ per layer: ``cfg.lam`` (absolute), or ``cfg.lam`` × mean diag F̂ with the mean over the live weights of all
    layers ('relative') or of each layer ('relative_layer'). ``diag_sums``: per layer, the sum of diag F̂ (without
    λ) over its weights; ``live``: per layer, its weights still alive. A mean that is zero or not finite (no
    gradient at all) leaves ``cfg.lam`` as it is."""
    if cfg.lam_scale not in LAM_SCALES:
        raise ValueError(f"lam_scale must be one of {LAM_SCALES}, not {cfg.lam_scale!r}")
    if cfg.lam_scale == "absolute":
        return dict.fromkeys(diag_sums, cfg.lam)

    def scaled(total: float, count: float) -> float:
        mean = total / count if count > 0 else 0.0
        return cfg.lam * mean if math.isfinite(mean) and mean > 0 else cfg.lam

    if cfg.lam_scale == "relative_layer":
        return {n: scaled(diag_sums[n], live[n]) for n in diag_sums}
    lam = scaled(sum(diag_sums.values()), sum(live.values()))
    return dict.fromkeys(diag_sums, lam)


def live_counts(layout: BlockLayout, mask: Tensor) -> dict[str, float]:
    """Per layer, the weights the 0/1 ``mask`` (layout order) keeps."""
    return {layer.name: float(mask[layer.offset : layer.offset + layer.numel].sum()) for layer in layout.layers}


@dataclass
class Curvature:
    segments: list[Segment]
    grad: Tensor | None = None  # mean gradient in layout order (first-order term), if measured
    info: dict = field(default_factory=dict)
    #: the effective λ of each layer (absolute; the relative forms resolved), for the report
    lambdas: dict[str, float] = field(default_factory=dict)


class CurvatureEstimator(Protocol):
    """Builds block-diagonal inverse curvature for the layout's weights at the model's point."""

    #: block size the layout must use (None: one block per layer)
    block_size: int | None

    def estimate(
        self,
        model: nn.Module,
        layout: BlockLayout,
        mask: Tensor,
        data: tuple[Tensor, Tensor],
        progress: Progress | None = None,
    ) -> Curvature: ...


def layer_segments(layout: BlockLayout, make) -> list[Segment]:
    """One segment per layer, ``make(layer)`` giving its BlockInverse."""
    return [Segment(layer.offset, make(layer)) for layer in layout.layers]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
