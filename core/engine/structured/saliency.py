"""Which groups of a layer's input columns to remove, and the update of the columns that stay.

A unit of a layer's producer (a hidden neuron, a conv channel, an FFN unit, an attention head) feeds a group Q of its
consumer's input columns (one column, a channel's kh·kw columns, a head's d_head columns). Removing the unit is
removing those columns. With H = 2·XᵀX/n over the consumer's inputs (:mod:`core.engine.layerwise.hessian`), the
least-squares cost of removing Q from every row w of the consumer, the other columns re-fitted, is the OBS group
saliency (Kurtic et al. 2022, ZipLM 2023; OBC structured)

    ρ_Q = ½ · Σ_rows w_Qᵀ ((H⁻¹)_QQ)⁻¹ w_Q,        δW = −W_Q ((H⁻¹)_QQ)⁻¹ (H⁻¹)_{Q,:}

and after the removal H⁻¹ loses Q by one Schur complement, H⁻¹ ← H⁻¹ − H⁻¹_{:,Q} ((H⁻¹)_QQ)⁻¹ H⁻¹_{Q,:}.
:func:`obs_groups` removes groups greedily, one at a time, each chosen after the updates of the ones before (so
with dampening 0 every choice is the exact least-squares best next group). :func:`l2_groups` is the baseline: the
groups with the smallest L2 norm over all their coupled weights, no update.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.engine.layerwise.hessian import inverse

__all__ = ["column_groups", "l2_groups", "obs_groups"]


def column_groups(units: int, columns: int, skip_last: int = 0) -> Tensor:
    """(units, columns // units) column indices: unit u owns the ``u``-th contiguous run (a Linear's column, a conv
    channel's kh·kw columns of ``weight.flatten(1)``, a head's d_head columns); ``skip_last`` columns at the end
    (an appended bias column) belong to no unit."""
    width = columns - skip_last
    if units < 1 or width % units:
        raise ValueError(f"{width} input columns do not split into {units} equal units")
    return torch.arange(width).reshape(units, width // units)


def obs_groups(
    w: Tensor, h: Tensor, groups: Tensor, remove: int, *, damp: float = 0.01
) -> tuple[Tensor, list[int], list[float]]:
    """Remove ``remove`` of the column ``groups`` (G, q) of the (rows, cols) weights ``w``, greedily by OBS group
    saliency on the input Hessian ``h`` (cols × cols), with the joint update of the remaining columns.

    Returns (the updated weights, float64, the removed groups' columns zero; the removed group indices in order;
    the saliency of each removal, ½·ΔW H ΔWᵀ summed over rows, H undamped in exact arithmetic only when damp = 0)."""
    W = w.detach().to(torch.float64).clone()
    hinv = inverse(h, damp) if damp > 0 else torch.linalg.inv(h.to(torch.float64))
    alive = torch.ones(len(groups), dtype=torch.bool)
    removed: list[int] = []
    losses: list[float] = []
    for _ in range(int(remove)):
        idx = torch.nonzero(alive).flatten()
        cols = groups[idx]  # (g, q)
        a = hinv[cols[:, :, None], cols[:, None, :]]  # (g, q, q): (H⁻¹)_QQ per candidate
        wq = W[:, cols].permute(1, 2, 0)  # (g, q, rows)
        lower, info = torch.linalg.cholesky_ex(a)
        if int(info.max()):  # a (numerically) singular block: fall back to a least-squares solve
            s = torch.linalg.lstsq(a, wq).solution
        else:
            s = torch.cholesky_solve(wq, lower)  # ((H⁻¹)_QQ)⁻¹ w_Q
        scores = 0.5 * (wq * s).sum((1, 2))
        best = int(torch.argmin(scores))
        g, q = int(idx[best]), groups[int(idx[best])]
        W -= s[best].T @ hinv[q, :]
        W[:, q] = 0.0
        hinv -= hinv[:, q] @ torch.linalg.solve(hinv[q][:, q], hinv[q, :])
        hinv[q, :] = 0.0
        hinv[:, q] = 0.0
        alive[g] = False
        removed.append(g)
        losses.append(float(scores[best]))
    return W, removed, losses


def l2_groups(norms_sq: Tensor, remove: int) -> list[int]:
    """The ``remove`` groups with the smallest squared L2 norm ``norms_sq`` (G,) over all their coupled weights."""
    return torch.argsort(norms_sq.to(torch.float64), stable=True)[: int(remove)].tolist()
