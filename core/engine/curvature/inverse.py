"""Batched inverse curvature blocks: what OBS needs from F⁻¹, and nothing more.

Every representation holds ``nb`` independent blocks of size ``c`` and answers three questions,
all batched over blocks (tensors shaped ``(nb, c)``):

* ``diag()``              — diag(F⁻¹)
* ``matvec(v)``           — F⁻¹ v
* ``masked_solve(p, v)``  — x with x_P = (F⁻¹_PP)⁻¹ v_P and x = 0 off P  (P = {p == 1})

so that the joint OBS update over a set P is ``δw = −F⁻¹ x`` (see ``core.engine.obs``).
A ``Segment`` places one such representation at its offset in the flat weight vector.

``DenseInverse`` keeps F⁻¹ explicitly (c ≤ m). ``WoodburyInverse`` keeps the low-rank form
(c > m): with F = λI + GᵀG/m, G of shape (m, c) and S = mλI + GGᵀ = LLᵀ,

    F⁻¹ = (I − WᵀW) / λ,      W = L⁻¹G   (m × c),

so memory is O(c·m) and F⁻¹ is never materialised. The masked solve stays in the m×m space:
(F⁻¹_PP)⁻¹ = λ (I − W_PᵀW_P)⁻¹ = λ (I + W_Pᵀ (I − W_P W_Pᵀ)⁻¹ W_P).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from core.errors import NumericalError


class BlockInverse(Protocol):
    """F⁻¹ for ``nb`` blocks of size ``c``; vectors are shaped ``(nb, c)``."""

    nb: int
    c: int

    def diag(self) -> Tensor: ...

    def matvec(self, v: Tensor) -> Tensor: ...

    def masked_solve(self, p: Tensor, v: Tensor) -> Tensor: ...


@dataclass
class Segment:
    """A run of ``inv.nb`` blocks of ``inv.c`` weights starting at ``offset`` in the flat vector."""

    offset: int
    inv: BlockInverse

    def view(self, flat: Tensor) -> Tensor:
        return flat[self.offset : self.offset + self.inv.nb * self.inv.c].view(self.inv.nb, self.inv.c)


def _embed_identity(a: Tensor, p: Tensor) -> Tensor:
    """P A P + (I − P) for a batch of square matrices and 0/1 vectors p."""
    pp = p.unsqueeze(-1) * p.unsqueeze(-2)
    eye = torch.diag_embed(1.0 - p)
    return a * pp + eye


@dataclass
class DenseInverse:
    """Explicit F⁻¹, shape ``(nb, c, c)``."""

    inv: Tensor

    @property
    def nb(self) -> int:
        return self.inv.shape[0]

    @property
    def c(self) -> int:
        return self.inv.shape[-1]

    @classmethod
    def from_matrix(cls, f: Tensor) -> DenseInverse:
        """Invert SPD blocks ``f`` (nb, c, c) by Cholesky."""
        return cls(torch.cholesky_inverse(torch.linalg.cholesky(f)))

    def diag(self) -> Tensor:
        return self.inv.diagonal(dim1=-2, dim2=-1)

    def matvec(self, v: Tensor) -> Tensor:
        return (self.inv @ v.unsqueeze(-1)).squeeze(-1)

    def masked_solve(self, p: Tensor, v: Tensor) -> Tensor:
        m = _embed_identity(self.inv, p.to(self.inv.dtype))
        return torch.cholesky_solve((p * v).unsqueeze(-1), torch.linalg.cholesky(m)).squeeze(-1)


@dataclass
class WoodburyInverse:
    """Low-rank form F⁻¹ = (I − WᵀW)/λ with ``w`` shaped ``(nb, m, c)``."""

    w: Tensor
    lam: float

    @property
    def nb(self) -> int:
        return self.w.shape[0]

    @property
    def c(self) -> int:
        return self.w.shape[-1]

    def diag(self) -> Tensor:
        # a norm reduction: no (m × c) temporary, unlike w.square().sum()
        return (1.0 - torch.linalg.vector_norm(self.w, dim=-2).square()) / self.lam

    def matvec(self, v: Tensor) -> Tensor:
        wv = (self.w @ v.unsqueeze(-1)).squeeze(-1)  # (nb, m)
        return (v - (self.w.mT @ wv.unsqueeze(-1)).squeeze(-1)) / self.lam

    def masked_solve(self, p: Tensor, v: Tensor) -> Tensor:
        p = p.to(self.w.dtype)
        wp = self.w * p.unsqueeze(-2)  # W_P: columns off P zeroed
        k = torch.eye(self.w.shape[-2], dtype=self.w.dtype, device=self.w.device) - wp @ wp.mT
        r = wp @ (p * v).unsqueeze(-1)  # (nb, m, 1)
        s = torch.cholesky_solve(r, torch.linalg.cholesky(k))
        return self.lam * (p * v + (wp.mT @ s).squeeze(-1))


@dataclass
class DiagonalInverse:
    """Diagonal F⁻¹ (magnitude: ones; diagonal Fisher: 1/(λ + E[g²])), shape ``(nb, c)``."""

    d: Tensor

    @property
    def nb(self) -> int:
        return self.d.shape[0]

    @property
    def c(self) -> int:
        return self.d.shape[-1]

    def diag(self) -> Tensor:
        return self.d

    def matvec(self, v: Tensor) -> Tensor:
        return self.d * v

    def masked_solve(self, p: Tensor, v: Tensor) -> Tensor:
        return p.to(v.dtype) * v / self.d


def _gram(g: Tensor, lam: float, small_side: bool) -> Tensor:
    """m·F_b = GᵀG + mλI (dense, c × c) or S = GGᵀ + mλI (Woodbury, m × m)."""
    a = g @ g.mT if small_side else g.mT @ g
    a.diagonal(dim1=-2, dim2=-1).add_(g.shape[-2] * lam)
    return a


def _cholesky(a: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Batched Cholesky of the Gram matrices ``a`` (from gradients of ``dtype``), in place; blocks that fail in that
    precision (rounding can make λI + GᵀG/m indefinite in float32 when gradients are large) are for the caller to
    rebuild from their gradients in float64. Returns (factors, indices of those blocks or None)."""
    info = torch.empty(a.shape[0], dtype=torch.int32, device=a.device)
    chol, info = torch.linalg.cholesky_ex(a, out=(a, info))
    bad = (info != 0).nonzero().flatten()
    if bad.numel() == 0 or dtype == torch.float64:
        if bad.numel():
            raise NumericalError(f"{bad.numel()} Fisher block(s) not positive definite even in float64: raise λ")
        return chol, None
    return chol, bad


def fisher_block_inverse(g: Tensor, lam: float) -> DenseInverse | WoodburyInverse:
    """Inverse of F_b = λI + G_bᵀG_b/m for gradient blocks ``g`` shaped ``(nb, m, c)``.

    Chooses the cheaper exact form: dense Cholesky (GEMM ``(nb, c, c)``) when c ≤ m, else the
    Woodbury form (GEMM ``(nb, m, m)`` + one triangular solve), memory O(c·m) per block.
    """
    if lam <= 0:
        raise ValueError("the dampening λ must be positive")
    _nb, m, c = g.shape
    dense = c <= m
    a = _gram(g, lam, small_side=not dense)  # the GEMM: every intra-op thread
    with _one_thread(g.device):  # LAPACK, once per block: one thread (see _one_thread)
        chol, bad = _cholesky(a, g.dtype)
        if bad is not None:  # placeholder factors; these blocks are redone in float64 below
            chol[bad] = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
        if dense:
            inv = torch.cholesky_inverse(chol).mul_(m)  # (GᵀG + mλI)⁻¹·m = F⁻¹
        else:
            inv = torch.linalg.solve_triangular(chol, g, upper=False)
        if bad is not None:  # redo the failed blocks in float64
            g64 = g[bad].double()
            chol64 = torch.linalg.cholesky(_gram(g64, lam, small_side=not dense))
            redo = (
                torch.cholesky_inverse(chol64) * m if dense else torch.linalg.solve_triangular(chol64, g64, upper=False)
            )
            inv[bad] = redo.to(inv.dtype)
    return DenseInverse(inv) if dense else WoodburyInverse(inv, lam)


#: bytes of Gram matrices factored at once by ``gram_block_inverse``: its memory beyond the Gram matrices is two
#: such slices (the slice's factor and its inverse)
GRAM_SLICE_BYTES = 16 * 2**20


def gram_slice_bytes(nb: int, c: int, itemsize: int) -> int:
    """The transient of ``gram_block_inverse`` on ``nb`` blocks of c × c: one slice's factor and its inverse."""
    return 2 * min(nb, max(1, GRAM_SLICE_BYTES // (c * c * itemsize))) * c * c * itemsize


def gram_block_inverse(gram: Tensor, m: int, lam: float) -> DenseInverse:
    """Inverse of F_b = λI + A_b/m from accumulated Gram matrices A_b = Σᵢ gᵢgᵢᵀ shaped ``(nb, c, c)`` (the streamed
    Fisher: the gradients themselves are gone). ``gram`` is consumed: it becomes F⁻¹ in place, a slice of blocks
    (``GRAM_SLICE_BYTES``) at a time, so the only memory beyond it is one slice's factor and inverse. Blocks whose
    Cholesky fails in ``gram``'s precision are refactored in float64; a block that fails there too raises
    :class:`NumericalError`."""
    if lam <= 0:
        raise ValueError("the dampening λ must be positive")
    nb, c = gram.shape[0], gram.shape[-1]
    gram.diagonal(dim1=-2, dim2=-1).add_(m * lam)
    step = max(1, GRAM_SLICE_BYTES // (c * c * gram.element_size()))
    with _one_thread(gram.device):
        for start in range(0, nb, step):
            _invert_slice(gram[start : start + step], m)
    return DenseInverse(gram)


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU: LAPACK on a 64 × 64 block is over before a second thread helps, and where
    the cores are shared a thread that waits for its partner waits for the scheduler (measured: 4096 blocks in 1.0 s
    on one thread, 9.7–12.3 s on two, load ≈ 12 on 2 cores; Cholesky + inverse at load 3–6, one thread vs two:
    4096 blocks of 64 1.3–1.9 s vs 9.4–10.1 s, 1024 of 128 1.3–2.5 s vs 13–15 s, 32 of 512 0.7–0.8 s vs 2.5–4.1 s,
    8 of 1024 0.9–1.0 s vs 7.6–16.4 s). Used by both the streamed (Gram) and the buffered (gradient) inverse."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _invert_slice(a: Tensor, m: int) -> None:
    """``a`` (a view of whole blocks, λ already added) := m·(a)⁻¹ by Cholesky, blocks that fail refactored in
    float64."""
    c = a.shape[-1]
    chol, info = torch.linalg.cholesky_ex(a)
    bad = (info != 0).nonzero().flatten()
    chol64 = None
    if bad.numel():
        if a.dtype == torch.float64:
            raise NumericalError(f"{bad.numel()} Fisher block(s) not positive definite even in float64: raise λ")
        chol64, info64 = torch.linalg.cholesky_ex(a[bad].double())
        if bool((info64 != 0).any()):
            raise NumericalError(f"{int((info64 != 0).sum())} Fisher block(s) not positive definite: raise λ")
        chol[bad] = torch.eye(c, dtype=chol.dtype, device=chol.device)
    a.copy_(torch.cholesky_inverse(chol).mul_(m))  # (A + mλI)⁻¹·m = F⁻¹
    del chol
    if chol64 is not None:
        a[bad] = (torch.cholesky_inverse(chol64) * m).to(a.dtype)
