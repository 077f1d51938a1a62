"""Exact OBS: the full Hessian of the loss over all selected weights (tiny models only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian

from core.engine.curvature.base import Curvature, Progress
from core.engine.curvature.inverse import DenseInverse, Segment
from core.engine.grads import Loss, loss_fn
from core.engine.layout import BlockLayout
from core.engine.modes import eval_mode


def loss_hessian(
    model: nn.Module, layout: BlockLayout, x: Tensor, y: Tensor, loss: Loss | str
) -> tuple[Tensor, Tensor]:
    """(H, g): Hessian and gradient of the mean loss over (x, y) w.r.t. the flat selected weights."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    criterion = loss_fn(loss)
    flat0 = layout.flatten({n: params[n] for n in layout.names})

    def f(flat: Tensor) -> Tensor:
        return criterion(functional_call(model, ({**params, **layout.unflatten(flat)}, buffers), (x,)), y)

    with eval_mode(model):
        h = hessian(f)(flat0)
        g = torch.func.grad(f)(flat0)
    return h, g


@dataclass
class ExactHessian:
    """One block over all weights; eigenvalues clamped at λ so H⁻¹ exists off a minimum."""

    lam: float = 1e-6
    loss: Loss = Loss.CROSS_ENTROPY
    max_weights: int = 5000
    block_size: int | None = None

    def estimate(
        self, model: nn.Module, layout: BlockLayout, mask: Tensor, data, progress: Progress | None = None
    ) -> Curvature:
        if layout.width > self.max_weights:
            raise ValueError(f"exact OBS is for tiny models: {layout.width} weights > {self.max_weights}")
        x, y = data
        h, g = loss_hessian(model, layout, x.to(mask.dtype), y, self.loss)
        evals, evecs = torch.linalg.eigh(h.to(mask.dtype))
        inv = (evecs / evals.clamp_min(self.lam)) @ evecs.T
        if progress:
            progress(1, 1)
        return Curvature([Segment(0, DenseInverse(inv.unsqueeze(0)))], grad=g.to(mask.dtype) * mask)
