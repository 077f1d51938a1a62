"""Batched/Woodbury block inverses against the sequential Sherman–Morrison oracle (float64)."""

import pytest
import torch

from core.engine.curvature.inverse import DenseInverse, WoodburyInverse, fisher_block_inverse
from core.engine.curvature.sherman_morrison import sherman_morrison_inverse
from core.errors import NumericalError


def rel(a, b):
    return float((a - b).norm() / b.norm())


def explicit(inv, c):
    """Materialise F⁻¹ (nb, c, c) through matvecs with the identity's columns."""
    eye = torch.eye(c, dtype=torch.float64)
    cols = [inv.matvec(eye[j].expand(inv.nb, c)) for j in range(c)]
    return torch.stack(cols, dim=-1)


@pytest.mark.parametrize(
    "nb,m,c,kind", [(7, 40, 12, DenseInverse), (5, 9, 30, WoodburyInverse), (3, 16, 16, DenseInverse)]
)
def test_block_inverse_matches_sherman_morrison(nb, m, c, kind):
    torch.manual_seed(0)
    g = torch.randn(nb, m, c, dtype=torch.float64)
    lam = 1e-2
    inv = fisher_block_inverse(g, lam)
    assert isinstance(inv, kind)
    oracle = sherman_morrison_inverse(g, lam)
    assert rel(explicit(inv, c), oracle) < 1e-8
    assert rel(inv.diag(), oracle.diagonal(dim1=-2, dim2=-1)) < 1e-8
    v = torch.randn(nb, c, dtype=torch.float64)
    assert rel(inv.matvec(v), (oracle @ v.unsqueeze(-1)).squeeze(-1)) < 1e-8


def test_sherman_morrison_oracle_is_the_inverse():
    torch.manual_seed(1)
    g = torch.randn(2, 20, 8, dtype=torch.float64)
    f = 0.1 * torch.eye(8, dtype=torch.float64) + g.mT @ g / 20
    assert rel(sherman_morrison_inverse(g, 0.1), torch.linalg.inv(f)) < 1e-10


@pytest.mark.parametrize("m,c", [(40, 12), (9, 30)])
def test_masked_solve_inverts_the_restricted_inverse(m, c):
    torch.manual_seed(2)
    nb = 4
    g = torch.randn(nb, m, c, dtype=torch.float64)
    inv = fisher_block_inverse(g, 0.05)
    oracle = sherman_morrison_inverse(g, 0.05)
    p = (torch.rand(nb, c) < 0.4).double()
    p[:, 0] = 1
    v = torch.randn(nb, c, dtype=torch.float64)
    x = inv.masked_solve(p, v)
    for b in range(nb):
        q = p[b].bool()
        expect = torch.linalg.solve(oracle[b][q][:, q], v[b][q])
        assert rel(x[b][q], expect) < 1e-8
        assert torch.all(x[b][~q] == 0)


def test_woodbury_never_materialises_c_by_c():
    g = torch.randn(1, 8, 5000)
    inv = fisher_block_inverse(g, 1e-3)
    assert isinstance(inv, WoodburyInverse) and inv.w.shape == (1, 8, 5000)


def test_dampening_must_be_positive():
    with pytest.raises(ValueError):
        fisher_block_inverse(torch.randn(1, 4, 4), 0.0)


def test_float32_blocks_that_round_indefinite_are_rebuilt_in_float64():
    """Large, repeated gradient coordinates with a small λ: λI + GᵀG/m rounds indefinite in float32."""
    from core.engine.curvature.inverse import _gram

    torch.manual_seed(3)
    col = torch.randn(2, 50, 1) * 1e4
    g = torch.cat([col, col, col, torch.randn(2, 50, 5)], dim=-1)
    for gg in (g, g[:, :6]):  # dense (c ≤ m) and Woodbury (c > m)
        small = gg.shape[-1] > gg.shape[-2]
        assert torch.linalg.cholesky_ex(_gram(gg, 1e-3, small)).info.any()  # the float32 failure is real
        inv = fisher_block_inverse(gg, 1e-3)
        oracle = sherman_morrison_inverse(gg.double(), 1e-3)
        assert torch.isfinite(inv.diag()).all()
        failed = torch.linalg.cholesky_ex(_gram(gg, 1e-3, small)).info != 0
        # The rebuilt blocks are float64-accurate up to their conditioning: the repeated column leaves
        # eigenvalues of mλ = 0.05 beside ~1e10 (cond ~3e11), so even float64 Cholesky is good to
        # ~cond·eps ≈ 7e-5 (the exact digits depend on the CPU's BLAS).
        # Without the rebuild (placeholder factors) it is off by > 90 %.
        assert rel(inv.diag()[failed].double(), oracle.diagonal(dim1=-2, dim2=-1)[failed]) < 1e-4


def test_gram_inverse_in_place_slices_matches_the_float64_inverse(monkeypatch):
    """The streamed Fisher's Gram matrices are inverted in place, a slice of blocks at a time: with slices of 3
    blocks over 8 (the last one short) the result is F⁻¹ = (λI + A/m)⁻¹ of every block, in the Gram's own storage,
    and the memory the plan counts for it is two slices. An indefinite float64 block (in the second slice) is a
    NumericalError."""
    from core.engine.curvature import inverse

    monkeypatch.setattr(inverse, "GRAM_SLICE_BYTES", 3 * 16 * 16 * 4)
    torch.manual_seed(5)
    m, lam = 40, 1e-3
    g = torch.randn(8, m, 16)
    gram = g.mT @ g
    storage = gram.data_ptr()
    out = inverse.gram_block_inverse(gram, m, lam)
    assert out.inv.data_ptr() == storage and out.inv.shape == (8, 16, 16)
    g64 = g.double()
    oracle = torch.linalg.inv(lam * torch.eye(16, dtype=torch.float64) + g64.mT @ g64 / m)
    assert rel(out.inv.double(), oracle) < 1e-4
    assert inverse.gram_slice_bytes(8, 16, 4) == 2 * 3 * 16 * 16 * 4
    assert inverse.gram_slice_bytes(2, 16, 4) == 2 * 2 * 16 * 16 * 4  # a layer smaller than a slice
    bad = (g64.mT @ g64)[:8:2].clone()  # 4 blocks: slices of 3 (float32-sized) blocks = 1.5 float64 blocks → 1
    bad[2] = -torch.eye(16, dtype=torch.float64)
    with pytest.raises(NumericalError, match="not positive definite even in float64"):
        inverse.gram_block_inverse(bad, m, lam)


@pytest.mark.parametrize("m", [16, 4])  # dense (c ≤ m) and Woodbury (c > m)
def test_block_inverse_factors_on_one_thread_and_restores_the_count(monkeypatch, m):
    """The per-block LAPACK calls of the buffered inverse run on one intra-op thread (on shared cores two were
    5–15× slower, ``_one_thread``); the GEMM before them and the caller keep the thread count they had."""
    seen = []
    real = torch.linalg.cholesky_ex

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.randn(3, m, 8, dtype=torch.float64)
        inv = fisher_block_inverse(g, 1e-2)
        assert seen == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    f = g.mT @ g / m + 1e-2 * torch.eye(8, dtype=torch.float64)
    assert rel(explicit(inv, 8), torch.linalg.inv(f)) < 1e-10
