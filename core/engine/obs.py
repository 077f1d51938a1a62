"""One OBS pruning step over block-diagonal curvature: pure tensors in, tensors out.

Quadratic model of the loss around w, with g the mean gradient (0 for WoodFisher, the
first-order term for WoodTaylor) and F the curvature:

    δL(δw) = gᵀδw + ½ δwᵀ F δw,      subject to  w_q + δw_q = 0  for q ∈ Q.

With w̃ = w − F⁻¹g, the exact minimiser is δw = −F⁻¹(g + x), x_Q = (F⁻¹_QQ)⁻¹ w̃_Q (the joint solve),
and a single weight's cost is its saliency ρ_q = w̃_q² / (2 [F⁻¹]_qq). The paper's cheaper update
sums the single-weight solutions instead: x = w̃_Q / diag(F⁻¹)_Q. Either way, the predicted loss
change is δL = −gᵀz + ½ yᵀz with y = g + x, z = F⁻¹y. Pruned weights end exactly at zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from core.engine.curvature.inverse import Segment
from core.engine.layout import BlockLayout
from core.engine.patterns import Pattern, choose_flat


class Scope(str, Enum):
    GLOBAL = "global"
    LAYER = "layer"


@dataclass
class StepResult:
    weights: Tensor  # (D,) updated, zero where pruned
    mask: Tensor  # (D,) 1 keep / 0 pruned, as the weights' dtype
    predicted_loss_change: float


def saliency(w: Tensor, segments: list[Segment], grad: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ρ = w̃² / (2 diag F⁻¹) over the flat vector, and the shifted weights w̃ = w − F⁻¹g."""
    scores = torch.full_like(w, float("inf"))
    shifted = w.clone()
    for seg in segments:
        ws = seg.view(shifted)
        if grad is not None:
            ws -= seg.inv.matvec(seg.view(grad))
        seg.view(scores).copy_(ws.square() / (2 * seg.inv.diag()))
    return scores, shifted


def choose_mask(
    scores: Tensor,
    mask: Tensor,
    layout: BlockLayout,
    sparsity: float,
    scope: Scope | str,
    pattern: Pattern | None = None,
) -> Tensor:
    """Keep-mask pruning exactly round(sparsity·n) weights (per layer, or over all layers), within the
    ``pattern`` (N:M, blocks: :func:`core.engine.patterns.choose_flat`).

    Already-pruned weights stay pruned and count towards the target; padding never counts.
    """
    if pattern is not None and pattern.kind != "unstructured":
        return choose_flat(scores, mask, layout, sparsity, Scope(scope) is Scope.GLOBAL, pattern)
    valid = layout.valid(scores.device)
    scores = scores.masked_fill(mask == 0, float("-inf")).masked_fill(~valid, float("inf"))
    keep = mask.clone()
    ranges = (
        [(layer.offset, layer.numel) for layer in layout.layers] if Scope(scope) is Scope.LAYER else [(0, layout.width)]
    )
    for start, width in ranges:
        n = int(valid[start : start + width].sum())
        k = max(round(sparsity * n), int((mask[start : start + width][valid[start : start + width]] == 0).sum()))
        if k:
            idx = torch.topk(scores[start : start + width], k, largest=False).indices
            keep[start + idx] = 0
    return keep


def obs_update(
    w: Tensor,
    shifted: Tensor,
    keep: Tensor,
    segments: list[Segment],
    *,
    joint: bool,
    grad: Tensor | None = None,
) -> StepResult:
    """Apply the OBS update for the pruned set {keep == 0} and zero the pruned weights."""
    y = torch.zeros_like(w)
    pruned = 1 - keep
    for seg in segments:
        p, ws = seg.view(pruned), seg.view(shifted)
        x = seg.inv.masked_solve(p, ws) if joint else p * ws / seg.inv.diag()
        seg.view(y).copy_(x)
    if grad is not None:
        y += grad
    z = torch.zeros_like(w)
    for seg in segments:
        seg.view(z).copy_(seg.inv.matvec(seg.view(y)))
    predicted = 0.5 * torch.dot(y, z)
    if grad is not None:
        predicted -= torch.dot(grad, z)
    return StepResult((w - z) * keep, keep, float(predicted))


def obs_step(
    w: Tensor,
    mask: Tensor,
    segments: list[Segment],
    layout: BlockLayout,
    sparsity: float,
    *,
    scope: Scope | str = Scope.GLOBAL,
    joint: bool = False,
    grad: Tensor | None = None,
    pattern: Pattern | None = None,
) -> StepResult:
    """Prune the flat weights ``w`` to ``sparsity`` using the curvature ``segments``, within ``pattern``."""
    scores, shifted = saliency(w, segments, grad)
    keep = choose_mask(scores, mask, layout, sparsity, scope, pattern)
    return obs_update(w, shifted, keep, segments, joint=joint, grad=grad)
