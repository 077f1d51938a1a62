"""OBC / ExactOBS (Frantar & Alistarh 2022): exact greedy OBS per row of a layer, in float64.

A row w of a Linear (or Conv, im2col) layer reconstructs its outputs with error (w' − w)ᵀH(w' − w). Greedy OBS
removes, one at a time, the weight q of least saliency w_q² / [H⁻¹]_qq, updates the row by
δw = −(w_q / [H⁻¹]_qq)·H⁻¹[:, q] and the inverse by the row-wise rank-one downdate
H⁻¹ ← H⁻¹ − H⁻¹[:, q]H⁻¹[q, :] / [H⁻¹]_qq (the inverse of H with q removed), until the row's target. Rows are
independent: each row prunes round(sparsity · cols) weights; a batch of rows steps together (one batched op per
step), each row's inverse kept as H⁻¹ − CCᵀ with one column of C per removal (``ROW_BYTES`` bound the batch's C).
N:M: a weight is a candidate while its group has fewer than M − N pruned. Tiles span rows, so ``block:RxC``
chooses tiles by the summed saliencies first and then solves each row's optimal update for that fixed mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.engine.layerwise.hessian import damped, inverse
from core.engine.patterns import Pattern, prune_rows

#: bytes of the rows' factors held at once: a batch's factors staying in cache measured fastest (one thread; 384 ×
#: 384 at 50 %: 3.7 s at 16 MiB, 5.9 s at 256 MiB; 24 rows of 1536 inputs: 10.6 s against 21 s)
ROW_BYTES = 16 * 2**20


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
    k = round(sparsity * cols)
    if pattern.kind == "nm":  # at most the pattern's M − N per group (below it: a gradual schedule's earlier steps)
        k = min(k, (pattern.m - pattern.n) * (cols // pattern.m))
    targets = old.sum(1).clamp_min(k)
    steps = int(targets.max()) if rows else 0
    mask = old.clone()
    total = 0.0
    for r0, r1 in row_batches(rows, cols, steps):
        wb, done, loss = _greedy_rows(W[r0:r1], hinv, old[r0:r1], targets[r0:r1], steps, pattern)
        W[r0:r1], mask[r0:r1] = wb, done
        total += loss
    return W.to(w.dtype), mask, total


def row_bytes(cols: int, steps: int) -> int:
    """Bytes one row holds while it is pruned: its factor C (steps × cols) and a few cols-vectors, float64."""
    return 8 * cols * (steps + 8)


def batch_rows(rows: int, cols: int, steps: int) -> int:
    """Rows pruned together: as many as fit ``ROW_BYTES`` (at least one)."""
    return max(1, min(rows, ROW_BYTES // row_bytes(cols, steps)))


def held_bytes(rows: int, cols: int, steps: int) -> int:
    """Bytes of the row batch's factors and vectors (what :func:`obc` holds beyond H⁻¹ and the weights)."""
    return batch_rows(rows, cols, steps) * row_bytes(cols, steps)


def row_batches(rows: int, cols: int, steps: int) -> list[tuple[int, int]]:
    """[r0, r1) batches of :func:`batch_rows` rows."""
    batch = batch_rows(rows, cols, steps)
    return [(r0, min(rows, r0 + batch)) for r0 in range(0, rows, batch)]


def _greedy_rows(
    w: Tensor, hinv: Tensor, forced: Tensor, target: Tensor, steps: int, pattern: Pattern
) -> tuple[Tensor, Tensor, float]:
    """Greedy OBS on a batch of rows at once, all stepping together (a row past its target makes no-op steps).

    Row b's inverse after removing the set P is H⁻¹ − C_bC_bᵀ, with one column of C_b per removal: the removed
    column of the current inverse over √ of its diagonal (the rank-one downdate, kept as a factor). A step needs only
    the current inverse's diagonal (kept up to date by −c²) and its column q, H⁻¹[:, q] − C_b·C_b[q, :]ᵀ: O(cols · t)
    per row at step t instead of the O(cols²) of downdating a dense copy of H⁻¹."""
    b, cols = w.shape
    wb = w.clone()
    factor = torch.zeros(b, max(steps, 1), cols, dtype=w.dtype, device=w.device)  # C_bᵀ, one removal per row of it
    diag = hinv.diagonal().expand(b, cols).clone()
    done = torch.zeros(b, cols, dtype=torch.bool, device=w.device)
    idx = torch.arange(b, device=w.device)
    total = 0.0
    for t in range(steps):
        score = wb.square() / diag
        score = score.masked_fill(forced & ~done, float("-inf")).masked_fill(done, float("inf"))
        if pattern.kind == "nm":
            full = done.reshape(b, -1, pattern.m).sum(-1) >= pattern.m - pattern.n
            score = score.masked_fill(full.repeat_interleave(pattern.m, 1) & ~done, float("inf"))
        q = score.argmin(1)
        active = (t < target).to(wb.dtype)
        dq = diag[idx, q]
        col = hinv[q]  # (b, cols): H⁻¹[:, q] (symmetric), then minus C_b·C_b[q, :]ᵀ
        if t:
            col = col - torch.bmm(factor[idx, :t, q].unsqueeze(1), factor[:, :t]).squeeze(1)
        wq = wb[idx, q]
        total += float((active * wq.square() / dq).sum()) / 2
        wb -= (active * wq / dq).unsqueeze(1) * col
        c = col * (active / dq.sqrt()).unsqueeze(1)
        factor[:, t] = c
        diag -= c.square()
        done[idx, q] |= active.bool()
        wb.masked_fill_(done, 0.0)
        diag.masked_fill_(done, 1.0)  # removed coordinates: no 0/0 in later scores
    return wb, done, total
