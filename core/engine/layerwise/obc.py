"""OBC / ExactOBS (Frantar & Alistarh 2022): exact greedy OBS per row of a layer, in float64.

A row w of a Linear (or Conv, im2col) layer reconstructs its outputs with error (w' − w)ᵀH(w' − w). Greedy OBS
removes, one at a time, the weight q of least saliency w_q² / [H⁻¹]_qq, updates the row by
δw = −(w_q / [H⁻¹]_qq)·H⁻¹[:, q] and the inverse by the row-wise rank-one downdate
H⁻¹ ← H⁻¹ − H⁻¹[:, q]H⁻¹[q, :] / [H⁻¹]_qq (the inverse of H with q removed), until the row's target. Rows are
independent: each row prunes round(sparsity · cols) weights; a batch of rows is processed at once, each with its
own copy of H⁻¹ (``ROW_BYTES`` bound that memory). N:M: a weight is a candidate while its group has fewer than
M − N pruned. Tiles span rows, so ``block:RxC`` chooses tiles by the summed saliencies first and then solves each
row's optimal update for that fixed mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.engine.layerwise.hessian import damped, inverse
from core.engine.patterns import Pattern, prune_rows

#: bytes of the rows' H⁻¹ copies held at once
ROW_BYTES = 256 * 2**20


def _fixed_mask_update(W: Tensor, hinv: Tensor, mask: Tensor) -> Tensor:
    """Each row's exact optimal update for a given prune-mask: δw = −H⁻¹[:, P](H⁻¹_PP)⁻¹w_P."""
    out = W.clone()
    for r in range(W.shape[0]):
        p = mask[r].nonzero().squeeze(1)
        if len(p):
            x = torch.linalg.solve(hinv[p][:, p], W[r, p])
            out[r] -= hinv[:, p] @ x
    return out.masked_fill(mask, 0.0)


def obc(
    w: Tensor,
    h: Tensor,
    sparsity: float,
    pattern: Pattern | None = None,
    *,
    damp: float = 0.01,
    pruned: Tensor | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Prune the (rows, cols) matrix ``w`` with input Hessian ``h``: (the new weights, the prune-mask, the OBS
    loss ½·Σ_rows δwᵀHδw of the greedy steps)."""
    pattern = pattern or Pattern()
    hinv = inverse(h, damp)
    W = w.detach().to(torch.float64).clone()
    rows, cols = W.shape
    old = pruned if pruned is not None else torch.zeros_like(W, dtype=torch.bool)
    if pattern.kind == "block":
        mask = prune_rows(W.square() / hinv.diagonal(), sparsity, pattern, old)
        new = _fixed_mask_update(W, hinv, mask)
        dw = new - W
        loss = 0.5 * float(((dw @ damped(h, damp)) * dw).sum())
        return new.to(w.dtype), mask, loss
    k = (pattern.m - pattern.n) * (cols // pattern.m) if pattern.kind == "nm" else round(sparsity * cols)
    targets = old.sum(1).clamp_min(k)
    batch = max(1, min(rows, ROW_BYTES // max(1, cols * cols * 8)))
    mask = old.clone()
    total = 0.0
    for r0 in range(0, rows, batch):
        r1 = min(rows, r0 + batch)
        wb, hb = W[r0:r1].clone(), hinv.expand(r1 - r0, cols, cols).clone()
        done = torch.zeros(r1 - r0, cols, dtype=torch.bool, device=W.device)
        forced, target = old[r0:r1], targets[r0:r1]
        idx = torch.arange(r1 - r0, device=W.device)
        for step in range(int(target.max()) if len(target) else 0):
            diag = hb.diagonal(dim1=1, dim2=2)
            score = wb.square() / diag
            score = score.masked_fill(forced & ~done, float("-inf")).masked_fill(done, float("inf"))
            if pattern.kind == "nm":
                full = done.reshape(r1 - r0, -1, pattern.m).sum(-1) >= pattern.m - pattern.n
                score = score.masked_fill(full.repeat_interleave(pattern.m, 1) & ~done, float("inf"))
            q = score.argmin(1)
            active = (step < target).to(wb.dtype)
            dq = diag[idx, q]
            col = hb[idx, :, q]  # (B, cols)
            coef = active * wb[idx, q] / dq
            total += float((active * wb[idx, q].square() / dq).sum()) / 2
            wb -= coef.unsqueeze(1) * col
            hb.baddbmm_((col * (active / dq).unsqueeze(1)).unsqueeze(2), col.unsqueeze(1), alpha=-1)  # in place
            done[idx, q] |= active.bool()
            wb.masked_fill_(done, 0.0)
            hb.diagonal(dim1=1, dim2=2).masked_fill_(done, 1.0)  # removed coordinates: no 0/0 in later scores
        W[r0:r1] = wb
        mask[r0:r1] = done
    return W.to(w.dtype), mask, total
