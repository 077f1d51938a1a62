"""The curvature-estimator interface every pruning method plugs into."""

from __future__ import annotations

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


@dataclass
class Curvature:
    segments: list[Segment]
    grad: Tensor | None = None  # mean gradient in layout order (first-order term), if measured
    info: dict = field(default_factory=dict)


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
