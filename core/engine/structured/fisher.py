"""OBS group saliency on the empirical Fisher of a consumer's weights (WoodFisher with a structure).

A unit owns a group Q of its consumer's input columns (:func:`core.engine.structured.saliency.column_groups`), in
every row: the flat positions r·cols + j of ``weight.flatten(1)`` for each row r and each of the unit's columns j.
The curvature is WoodFisher's block-diagonal F = λI + (1/m)Σ gᵢgᵢᵀ over those weights (blocks of c consecutive
flat weights inside the layer, :class:`core.engine.layout.BlockLayout`; c = cols gives one block per row, where a
row's Q is a small block). F being block-diagonal, (F⁻¹)_QQ is too, so the cost of removing Q with every other
weight of the consumer re-fitted on the quadratic model ½·δwᵀFδw is

    ρ_Q = ½ Σ_blocks b  w_{Q,b}ᵀ ((F_b⁻¹)_{QQ})⁻¹ w_{Q,b},        δw_b = −F_b⁻¹[:, Q] ((F_b⁻¹)_{QQ})⁻¹ w_{Q,b},

a predicted increase of the training loss (the same units in every layer, which global allocation relies on).
:func:`fisher_groups` removes groups greedily, each chosen after the updates of the ones before, and downdates each
touched block's inverse by the Schur complement F_b⁻¹ ← F_b⁻¹ − F_b⁻¹[:, Q] ((F_b⁻¹)_QQ)⁻¹ F_b⁻¹[Q, :] (the
inverse of F restricted to the weights that remain), as :func:`core.engine.structured.saliency.obs_groups` does for
the layer-wise H. Each removal is then the exact minimiser of the quadratic model with every removed group held at
zero. The blocks are held explicitly in float64 (:func:`dense_blocks`; a Woodbury block is formed from its factor):
``held_bytes`` is what that costs, for the memory plan.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from core.engine.curvature.base import CurvatureEstimator
from core.engine.curvature.inverse import BlockInverse, DenseInverse, DiagonalInverse, WoodburyInverse
from core.engine.layout import BlockLayout

__all__ = ["consumer_inverse", "dense_blocks", "fisher_groups", "held_bytes", "prune_consumer", "unit_positions"]


def dense_blocks(inv: BlockInverse) -> Tensor:
    """F⁻¹ of every block as an explicit (nb, c, c) float64 tensor."""
    if isinstance(inv, DenseInverse):
        return inv.inv.to(torch.float64, copy=True)
    if isinstance(inv, WoodburyInverse):
        w = inv.w.to(torch.float64)
        eye = torch.eye(inv.c, dtype=torch.float64, device=w.device)
        return (eye - w.mT @ w) / inv.lam
    if isinstance(inv, DiagonalInverse):
        return torch.diag_embed(inv.d.to(torch.float64))
    raise TypeError(f"no explicit form for {type(inv).__name__}")


def unit_positions(rows: int, cols: int, units: int, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where each unit's weights lie in the blocks of ``block`` flat weights of a (rows, cols) weight, each unit owning
    ``cols // units`` consecutive columns of every row: (blocks (G, n), places in them (G, n, k), valid (G, n, k)),
    padded to the most blocks n a unit touches and the most places k it has in one block (padding: block 0, place
    0, not valid)."""
    per = cols // units
    r = torch.arange(rows)[:, None] * cols
    found = []
    for u in range(units):
        flat = (r + u * per + torch.arange(per)).flatten()  # ascending: row-major
        b, counts = torch.unique_consecutive(flat // block, return_counts=True)
        found.append((b, (flat % block).split(counts.tolist())))
    n = max(len(b) for b, _ in found)
    k = max(len(p) for _, places in found for p in places)
    blk = torch.zeros(units, n, dtype=torch.long)
    loc = torch.zeros(units, n, k, dtype=torch.long)
    valid = torch.zeros(units, n, k, dtype=torch.bool)
    for u, (b, places) in enumerate(found):
        blk[u, : len(b)] = b
        for i, p in enumerate(places):
            loc[u, i, : len(p)] = p
            valid[u, i, : len(p)] = True
    return blk, loc, valid


def held_bytes(rows: int, cols: int, units: int, block: int) -> int:
    """Bytes :func:`fisher_groups` holds at its peak for a (rows, cols) consumer in blocks of ``block``: the float64
    blocks; where a unit's blocks are not evenly spaced (a unit's columns straddle blocks), a downdate temporary of
    the touched blocks and its negation (n·c² each; else the downdate is in place); and every candidate's (k × k)
    blocks, their factors and solves (n and k: upper bounds)."""
    c = min(block, rows * cols)
    nb = math.ceil(rows * cols / c)
    per = cols // units
    in_place = c % cols == 0 or (cols % c == 0 and c % per == 0)
    n = nb if c >= cols else min(nb, 2 * rows)
    k = min(c, per * max(1, math.ceil(c / cols)))
    return 8 * (nb * c * c + (0 if in_place else 2 * n * c * c) + units * n * (2 * k * k + 3 * k))


def _downdate(F: Tensor, blocks: Tensor, cols: Tensor, solved: Tensor, real: Tensor) -> None:
    """F[blocks] −= cols @ solved over the ``real`` (not padding) entries: in place on a strided view when the blocks
    are evenly spaced (whole rows: every block; c dividing the row: every cols/c-th), which is one pass over them;
    else through ``index_add_`` (a temporary of the touched blocks)."""
    b, cols, solved = blocks[real], cols[real], solved[real]
    step = int(b[1] - b[0]) if len(b) > 1 else 1
    first, last = int(b[0]), int(b[-1])
    if step > 0 and last - first == step * (len(b) - 1) and bool((b.diff() == step).all()):
        F[first : last + 1 : step].baddbmm_(cols, solved, alpha=-1.0)
    else:
        F.index_add_(0, b, -(cols @ solved))


def fisher_groups(
    w: Tensor, finv: Tensor, positions: tuple[Tensor, Tensor, Tensor], remove: int
) -> tuple[Tensor, list[int], list[float]]:
    """Remove ``remove`` units greedily by Fisher group saliency, with the OBS update of the weights that remain.

    ``w``: the consumer's weights in blocks, (nb, c) (:meth:`core.engine.layout.LayerSlice.blocks`, padding zero);
    ``finv``: (nb, c, c) F⁻¹ per block (:func:`dense_blocks`), consumed: a float64 one is downdated in place (no
    second copy of the blocks); ``positions``: :func:`unit_positions`.
    Returns (the updated (nb, c) weights, float64, the removed units' weights zero; the removed units in order; the
    saliency of each removal, its increase of ½·δwᵀFδw)."""
    blk, loc, valid = (t.to(w.device) for t in positions)
    W = w.detach().to(torch.float64).clone()
    F = finv.to(torch.float64)
    c = F.shape[-1]
    alive = torch.ones(len(blk), dtype=torch.bool, device=w.device)
    removed: list[int] = []
    losses: list[float] = []
    for _ in range(int(remove)):
        idx = torch.nonzero(alive).flatten()
        b, p, v = blk[idx], loc[idx], valid[idx].to(torch.float64)  # (g, n), (g, n, k), (g, n, k)
        a = F[b[..., None, None], p[..., :, None], p[..., None, :]]  # (g, n, k, k): (F_b⁻¹)_QQ
        a = a * v[..., :, None] * v[..., None, :] + torch.diag_embed(1.0 - v)  # padding: identity
        wq = W[b[..., None], p] * v  # (g, n, k)
        lower, info = torch.linalg.cholesky_ex(a)
        if int(info.max()):  # a (numerically) singular block: least squares
            s = torch.linalg.lstsq(a, wq[..., None]).solution[..., 0]
        else:
            s = torch.cholesky_solve(wq[..., None], lower)[..., 0]  # ((F_b⁻¹)_QQ)⁻¹ w_Q
        scores = 0.5 * (wq * s).sum((1, 2))
        best = int(torch.argmin(scores))
        u, bu, pu, vu = int(idx[best]), b[best], p[best], v[best]
        cols = F[bu[:, None, None], torch.arange(c, device=F.device)[None, :, None], pu[:, None, :]] * vu[:, None, :]
        W.index_add_(0, bu, -(cols @ s[best][..., None])[..., 0])  # δw_b = −F_b⁻¹[:, Q] s
        solved = torch.linalg.solve(a[best], cols.mT)  # ((F_b⁻¹)_QQ)⁻¹ F_b⁻¹[Q, :]
        _downdate(F, bu, cols, solved, vu.any(-1))
        keep = valid[u]
        qb, qp = bu[:, None].expand_as(pu)[keep], pu[keep]
        W[qb, qp] = 0.0
        F[qb, qp, :] = 0.0
        F[qb, :, qp] = 0.0
        alive[u] = False
        removed.append(u)
        losses.append(float(scores[best]))
    return W, removed, losses


def consumer_inverse(
    model: nn.Module, name: str, estimator: CurvatureEstimator, data: tuple[Tensor, Tensor], dtype: torch.dtype
) -> tuple[Tensor, float | None]:
    """(F⁻¹ of the weight ``name`` alone, as explicit (nb, c, c) float64 blocks; the effective λ): the estimator's
    own estimate (gradients restricted to that weight, its path, its relative λ) on ``data`` at the model's point."""
    param = model.get_parameter(name)
    layout = BlockLayout.for_model(model, [name], estimator.block_size)
    mask = layout.flatten({name: torch.ones_like(param)}, dtype).to(param.device)
    curvature = estimator.estimate(model, layout, mask, data)
    return dense_blocks(curvature.segments[0].inv), curvature.lambdas.get(name)


def prune_consumer(weight: Tensor, units: int, finv: Tensor, remove: int) -> tuple[Tensor, list[int], list[float]]:
    """:func:`fisher_groups` on a consumer's ``weight`` (any shape, ``weight.flatten(1)`` its rows × input columns,
    ``units`` equal runs of columns) with ``finv`` its (nb, c, c) blocks; (the updated weight in its own shape and
    dtype, the removed units, their saliencies)."""
    rows, cols = weight.flatten(1).shape
    layer = BlockLayout({"w": (rows, cols)}, finv.shape[-1]).layers[0]
    flat = torch.zeros(layer.width, dtype=torch.float64, device=weight.device)
    flat[: layer.numel] = weight.detach().flatten()
    positions = unit_positions(rows, cols, units, layer.block)
    new, removed, losses = fisher_groups(layer.blocks(flat), finv, positions, remove)
    return new.flatten()[: layer.numel].reshape(weight.shape).to(weight.dtype), removed, losses
