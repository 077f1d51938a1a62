"""Wanda (Sun et al. 2024): score |W_ij|·‖X_j‖₂, compared within each output row; no weight update.

‖X_j‖₂² is the sum of squares of input j over the calibration rows, n/2 · H_jj with H = 2XᵀX/n: within a row
the common factor n/2 changes no comparison, so the score is |W_ij|·√H_jj.
"""

from __future__ import annotations

from torch import Tensor

from core.engine.patterns import Pattern, prune_rows


def wanda(
    w: Tensor, h: Tensor, sparsity: float, pattern: Pattern | None = None, *, pruned: Tensor | None = None
) -> tuple[Tensor, Tensor, float]:
    """(the weights with the lowest scores of every row zeroed, the prune-mask, 0.0: no loss is modelled)."""
    scores = w.detach().abs().to(h.dtype) * h.diagonal().clamp_min(0).sqrt().unsqueeze(0)
    mask = prune_rows(scores, sparsity, pattern or Pattern(), pruned)
    return w.detach().masked_fill(mask, 0.0), mask, 0.0
