"""Sequential Sherman–Morrison inverse of F = λI + (1/m) Σ gᵢgᵢᵀ — the test oracle and bench baseline.

One rank-one update per gradient (batched over blocks only), as in the paper's eq. (3):
F_i⁻¹ = F_{i−1}⁻¹ − (F_{i−1}⁻¹ gᵢ)(F_{i−1}⁻¹ gᵢ)ᵀ / (m + gᵢᵀ F_{i−1}⁻¹ gᵢ).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sherman_morrison_inverse(g: Tensor, lam: float) -> Tensor:
    """Explicit (nb, c, c) inverses from gradient blocks ``g`` of shape (nb, m, c)."""
    nb, m, c = g.shape
    inv = torch.eye(c, dtype=g.dtype, device=g.device).repeat(nb, 1, 1) / lam
    for i in range(m):
        u = (inv @ g[:, i].unsqueeze(-1)).squeeze(-1)  # F⁻¹g  (nb, c)
        denom = m + (g[:, i] * u).sum(-1)
        inv -= u.unsqueeze(-1) * u.unsqueeze(-2) / denom[:, None, None]
    return inv
