"""A layer's curvature from its calibration inputs: H = 2·XᵀX/n as a running mean, and its damped inverse factor.

Inputs become rows of X (n × d_in): a Linear's inputs flattened over every leading dimension, a Conv's patches
(im2col by ``unfold``, ordered like ``weight.flatten(1)``). A grouped Conv has one H per group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: dampening retries when a damped H is still not positive definite (each multiplies the dampening by 10)
RETRIES = 4


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def input_columns(module: nn.Module, x: Tensor) -> list[Tensor]:
    """The (n, d_in) input rows of a Linear or Conv for one call with input ``x``, one matrix per group."""
    if isinstance(module, nn.Linear):
        return [x.reshape(-1, x.shape[-1])]
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, stride, dilation = (1, module.kernel_size[0]), (1, module.stride[0]), (1, module.dilation[0])
        padding = module.padding if isinstance(module.padding, str) else (0, module.padding[0])
    elif isinstance(module, nn.Conv2d):
        kernel, stride, dilation, padding = module.kernel_size, module.stride, module.dilation, module.padding
    else:
        raise TypeError(f"layer-wise pruning takes Linear and Conv layers, not {type(module).__name__}")
    kernel, stride, dilation = _pair(kernel), _pair(stride), _pair(dilation)
    if isinstance(padding, str):  # 'valid' or 'same' (stride 1): the padding on each side, as the conv pads
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)] if padding == "same" else [0, 0]
        x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        padding = (0, 0)
    elif module.padding_mode != "zeros" and any(_pair(padding)):
        p = _pair(padding)
        x = F.pad(x, (p[1], p[1], p[0], p[0]), mode=module.padding_mode)
        padding = (0, 0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=_pair(padding), stride=stride)  # (N, C·kh·kw, L)
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    g = module.groups
    return list(cols.chunk(g, dim=1)) if g > 1 else [cols]


class Hessian:
    """H = (2/n)·Σ xxᵀ over the n input rows seen so far, kept as a running mean (activations never stored)."""

    def __init__(self, d: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.h = torch.zeros(d, d, dtype=dtype, device=device)
        self.n = 0

    def add(self, rows: Tensor) -> None:
        b = rows.shape[0]
        if b == 0:
            return
        rows = rows.to(self.h.dtype)
        self.h.mul_(self.n / (self.n + b))
        self.n += b
        rows = rows * (2.0 / self.n) ** 0.5
        self.h.addmm_(rows.T, rows)


def damped(h: Tensor, damp: float) -> Tensor:
    """H + λI with λ = damp × mean(diag H) (damp itself when H is zero: no data, or dead inputs only). A dead
    input (zero diagonal) keeps only λ, so its weights have the lowest OBS saliency: they do nothing on the data."""
    out = h.to(torch.float64, copy=True)  # one copy (not a float64 view and then a clone of it)
    mean = float(out.diagonal().mean()) if out.numel() else 0.0
    lam = damp * mean if mean > 0 else max(damp, 1e-8)
    out.diagonal().add_(lam)
    return out


def inverse_factor(h: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(the damped H in float64, U): the upper Cholesky factor of (H + λI)⁻¹, by Cholesky LLᵀ → L⁻ᵀL⁻¹ (triangular
    solve) → upper Cholesky (never a general inverse of H). Row j of U is the first row of the inverse of the trailing
    sub-matrix H[j:, j:], divided by √ of its diagonal: what SparseGPT's column-by-column OBS update needs.
    If the damped H is not positive definite, the dampening grows ×10 (at most ``RETRIES`` times)."""
    for attempt in range(RETRIES + 1):
        hd = damped(h, damp * 10**attempt)
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            # H⁻¹ = L⁻ᵀL⁻¹ by a triangular solve (BLAS trsm; torch.cholesky_inverse was 3-7× slower
            # on this CPU for d = 768)
            eye = torch.eye(len(hd), dtype=hd.dtype, device=hd.device)
            linv = torch.linalg.solve_triangular(lower, eye, upper=False)
            del eye, lower  # at most four d × d float64 matrices at once (the damped H, L, I, L⁻¹)
            inv = linv.T @ linv
            del linv
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if int(info) == 0:
                return hd, upper
    raise torch.linalg.LinAlgError(
        f"the layer's input Hessian is not positive definite even with dampening {damp * 10**RETRIES:g} × its mean "
        "diagonal"
    )


def inverse(h: Tensor, damp: float) -> Tensor:
    """(H + λI)⁻¹ in float64 (what OBC updates row by row), as UᵀU from :func:`inverse_factor`."""
    _, upper = inverse_factor(h, damp)
    return upper.T @ upper
