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

A unit read by several consumers (a residual stream's channel: every block's first conv, a projection shortcut, the
classifier) owns a group of columns in each; :func:`obs_groups_coupled` scores it by the sum of its OBS saliencies
over the consumers, each on its own input Hessian, and updates every consumer's remaining columns (the exact
least-squares cost summed over consumers, each re-fitted independently).
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.engine.layerwise.hessian import inverse

__all__ = ["column_groups", "l2_groups", "obs_groups", "obs_groups_coupled"]


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
    (ws,), removed, losses = obs_groups_coupled([w], [h], [groups], remove, damp=damp)  # the one-consumer case
    return ws, removed, losses


def l2_groups(norms_sq: Tensor, remove: int) -> list[int]:
    """The ``remove`` groups with the smallest squared L2 norm ``norms_sq`` (G,) over all their coupled weights."""
    return torch.argsort(norms_sq.to(torch.float64), stable=True)[: int(remove)].tolist()


def _solve_blocks(a: Tensor, wq: Tensor) -> Tensor:
    """a⁻¹·wq for a batch of (q, q) positive definite blocks (least squares where one is numerically singular)."""
    lower, info = torch.linalg.cholesky_ex(a)
    if int(info.max()):
        return torch.linalg.lstsq(a, wq).solution
    return torch.cholesky_solve(wq, lower)


def obs_groups_coupled(
    ws: list[Tensor], hs: list[Tensor], groups: list[Tensor], remove: int, *, damp: float = 0.01
) -> tuple[list[Tensor], list[int], list[float]]:
    """:func:`obs_groups` for units read by several consumers: consumer k has weights ``ws[k]`` (rows, cols_k), input
    Hessian ``hs[k]`` and unit u's columns ``groups[k][u]`` (every ``groups[k]`` has the same G rows). Each greedy
    step removes the unit with the smallest saliency summed over the consumers and updates each consumer's remaining
    columns by its own OBS update.

    Returns (each consumer's updated weights, float64, the removed units' columns zero; the removed units in order;
    the summed saliency of each removal)."""
    if not (len(ws) == len(hs) == len(groups)) or len({len(g) for g in groups}) != 1:
        raise ValueError("every consumer needs weights, a Hessian and one column group per unit")
    Ws = [w.detach().to(torch.float64).clone() for w in ws]
    hinvs = [inverse(h, damp) if damp > 0 else torch.linalg.inv(h.to(torch.float64)) for h in hs]
    alive = torch.ones(len(groups[0]), dtype=torch.bool)
    removed: list[int] = []
    losses: list[float] = []
    for _ in range(int(remove)):
        idx = torch.nonzero(alive).flatten()
        scores = torch.zeros(len(idx), dtype=torch.float64)
        solutions = []
        for W, hinv, g in zip(Ws, hinvs, groups, strict=True):
            cols = g[idx]  # (candidates, q)
            wq = W[:, cols].permute(1, 2, 0)  # (candidates, q, rows)
            s = _solve_blocks(hinv[cols[:, :, None], cols[:, None, :]], wq)  # ((H⁻¹)_QQ)⁻¹ w_Q
            scores += 0.5 * (wq * s).sum((1, 2)).cpu()
            solutions.append(s)
        best = int(torch.argmin(scores))
        unit = int(idx[best])
        for W, hinv, g, s in zip(Ws, hinvs, groups, solutions, strict=True):
            q = g[unit]
            W -= s[best].T @ hinv[q, :]
            W[:, q] = 0.0
            hinv -= hinv[:, q] @ torch.linalg.solve(hinv[q][:, q], hinv[q, :])
            hinv[q, :] = 0.0
            hinv[:, q] = 0.0
        alive[unit] = False
        removed.append(unit)
        losses.append(float(scores[best]))
    return Ws, removed, losses
