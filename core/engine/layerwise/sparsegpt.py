"""SparseGPT (Frantar & Alistarh 2023): one shared inverse factor per layer, columns pruned left to right.

Column j's weights are removed (where the mask says) by the OBS update restricted to the columns not yet
processed: δW[:, j:] = −(w_j / U_jj) · U[j, j:], with U the upper Cholesky factor of H⁻¹
(:func:`core.engine.layerwise.hessian.inverse_factor`). Kept weights are frozen once their column is passed.
Columns go in blocks of ``blocksize``: inside a block the update is applied column by column, and one matmul pushes
the block's errors onto all later columns (lazy batching: the same result as ``blocksize`` 1, in fewer passes over
W). The mask is chosen per block from w² / U_jj² over the block (per row; block tiles per band of rows), and N:M
groups are chosen when their first column is reached, after the errors of the columns before have been applied
(below the pattern's sparsity, a gradual schedule's earlier steps: per block, among each group's candidates).
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.engine.layerwise.hessian import inverse_factor
from core.engine.patterns import Pattern, nm_full, prune_rows


def _blocksize(blocksize: int, pattern: Pattern) -> int:
    """The column block, a multiple of the pattern's group width (N:M: M, tiles: C)."""
    width = pattern.m if pattern.kind == "nm" else pattern.cols
    return max(width, blocksize - blocksize % width)


def sparsegpt(
    w: Tensor,
    h: Tensor,
    sparsity: float,
    pattern: Pattern | None = None,
    *,
    damp: float = 0.01,
    blocksize: int = 128,
    pruned: Tensor | None = None,
    fixed: Tensor | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Prune the (rows, cols) matrix ``w`` with input Hessian ``h`` (cols × cols) to ``sparsity``.

    ``pruned``: weights already pruned (they stay pruned); ``fixed``: a prune-mask to use instead of choosing one.
    Returns (the new weights, the prune-mask, the OBS loss Σ err² of the layer: ½·ΔWᵀHΔW summed over rows)."""
    pattern = pattern or Pattern()
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    _, u = inverse_factor(h, damp)
    u = u.to(dtype)
    W = w.detach().to(dtype).clone()
    rows, cols = W.shape
    out_mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    loss = torch.zeros(rows, dtype=dtype, device=W.device)
    bs = _blocksize(blocksize, pattern)
    nm = pattern.kind == "nm" and nm_full(sparsity, cols, pattern)  # below it: masks per block, as unstructured
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, U1 = W[:, i1:i2].clone(), u[i1:i2, i1:i2]
        d = U1.diagonal()
        err = torch.zeros_like(W1)
        old = pruned[:, i1:i2] if pruned is not None else None
        if fixed is not None:
            mask1 = fixed[:, i1:i2].clone()
        elif nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = prune_rows(W1.square() / d.square(), sparsity, pattern, old)
        for i in range(i2 - i1):
            if nm and fixed is None and i % pattern.m == 0:
                g = slice(i, i + pattern.m)
                mask1[:, g] = prune_rows(
                    W1[:, g].square() / d[g].square(), sparsity, pattern, old[:, g] if old is not None else None
                )
            col = W1[:, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            e = (col - q) / d[i]
            loss += e.square() / 2
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            err[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ u[i1:i2, i2:]
        out_mask[:, i1:i2] = mask1
    W.masked_fill_(out_mask, 0.0)
    return W.to(w.dtype), out_mask, float(loss.sum())
