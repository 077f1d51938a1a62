"""A relative λ (#13): λ = α × the mean diagonal of the Fisher estimate over the live pruned weights, checked
against F formed explicitly in float64 from the per-example gradients; every estimator resolves it the same way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.engine.curvature.base import FisherConfig, effective_lambdas, generator
from core.engine.curvature.fisher import DiagonalFisher, WoodFisher
from core.engine.curvature.kfac import KFAC, kfac_factors
from core.engine.grads import fisher_gradients
from core.engine.layout import BlockLayout, select_parameters

ALPHA = 0.3
M = 120


@pytest.fixture(scope="module")
def task():
    """A small float64 MLP, briefly trained (any point has a Fisher; these tests only compare it with its oracle)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(6, 3, generator=g, dtype=torch.float64)).argmax(-1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def _setup(task, block: int | None):
    model, x, y = task
    names = select_parameters(model)
    layout = BlockLayout.for_model(model, names, block)
    g = torch.Generator().manual_seed(1)
    keep = {
        n: (torch.rand(p.shape, generator=g, dtype=torch.float64) > 0.3).double()
        for n, p in model.named_parameters()
        if n in names
    }
    mask = layout.flatten(keep, torch.float64)
    return model, x, y, layout, mask


def _explicit_fisher(model, layout, x, y, mask, seed: int) -> torch.Tensor:
    """F = GᵀG/m over the padded width, from the masked per-example gradients (float64)."""
    grads = fisher_gradients(model, layout, x, y, m=M, generator=generator(seed), dtype=torch.float64).grads
    grads = grads * mask
    return grads.T @ grads / M


def _oracle(f: torch.Tensor, layout: BlockLayout, mask: torch.Tensor, per_layer: bool) -> dict[str, float]:
    diag = f.diagonal()
    out = {}
    for layer in layout.layers:
        part = slice(layer.offset, layer.offset + layer.numel)
        out[layer.name] = float(diag[part].sum() / mask[part].sum())
    if not per_layer:
        total = float(diag.sum() / mask.sum())
        out = dict.fromkeys(out, total)
    return {n: ALPHA * v for n, v in out.items()}


@pytest.mark.parametrize("scale", ["relative", "relative_layer"])
@pytest.mark.parametrize("path,block", [("buffered", 7), ("streamed", 7), ("buffered", None), ("streamed", None)])
def test_woodfisher_resolves_a_relative_lambda_from_the_explicit_fishers_mean_diagonal(task, scale, path, block):
    model, x, y, layout, mask = _setup(task, block)
    cfg = FisherConfig(m=M, lam=ALPHA, seed=3, path=path, chunk=32, lam_scale=scale)
    curvature = WoodFisher(cfg, block).estimate(model, layout, mask, (x, y))
    f = _explicit_fisher(model, layout, x, y, mask, seed=3)
    expected = _oracle(f, layout, mask, per_layer=scale == "relative_layer")
    assert curvature.lambdas == pytest.approx(expected, rel=1e-10)
    # and the inverse is the one of F + λ_eff·I: F⁻¹'s diagonal against the explicit inverse, block by block
    for seg, layer in zip(curvature.segments, layout.layers):
        lam = expected[layer.name]
        for b in range(layer.nb):
            lo = layer.offset + b * layer.block
            fb = f[lo : lo + layer.block, lo : lo + layer.block] + lam * torch.eye(layer.block, dtype=torch.float64)
            want = torch.linalg.inv(fb).diagonal()
            torch.testing.assert_close(seg.inv.diag()[b], want, rtol=1e-7, atol=1e-9)


def test_diagonal_fisher_resolves_the_same_mean_diagonal(task):
    model, x, y, layout, mask = _setup(task, None)
    cfg = FisherConfig(m=M, lam=ALPHA, seed=3, lam_scale="relative")
    curvature = DiagonalFisher(cfg).estimate(model, layout, mask, (x, y))
    f = _explicit_fisher(model, layout, x, y, mask, seed=3)
    expected = _oracle(f, layout, mask, per_layer=False)
    assert curvature.lambdas == pytest.approx(expected, rel=1e-10)
    lam = next(iter(expected.values()))
    live = mask.bool()
    got = torch.cat([seg.inv.diag().flatten() for seg in curvature.segments])
    torch.testing.assert_close(got[live], 1.0 / (f.diagonal()[live] + lam), rtol=1e-10, atol=0)


def test_kfac_resolves_the_mean_diagonal_of_its_kronecker_product(task):
    model, x, y, layout, mask = _setup(task, None)
    cfg = FisherConfig(m=M, lam=ALPHA, seed=3, chunk=32, lam_scale="relative_layer")
    curvature = KFAC(cfg).estimate(model, layout, mask, (x, y))
    factors = kfac_factors(model, layout.names, x, y, cfg)
    for layer in layout.layers:
        b, a = factors[layer.name]
        assert curvature.lambdas[layer.name] == pytest.approx(ALPHA * float(torch.kron(b, a).diagonal().mean()))


def test_absolute_is_lambda_itself_and_a_zero_diagonal_leaves_it():
    cfg = FisherConfig(lam=1e-3)
    assert effective_lambdas(cfg, {"a": 5.0, "b": 1.0}, {"a": 2.0, "b": 1.0}) == {"a": 1e-3, "b": 1e-3}
    rel = FisherConfig(lam=0.5, lam_scale="relative")
    assert effective_lambdas(rel, {"a": 5.0, "b": 1.0}, {"a": 2.0, "b": 1.0}) == {"a": 1.0, "b": 1.0}  # 0.5 × 6/3
    layer = FisherConfig(lam=0.5, lam_scale="relative_layer")
    assert effective_lambdas(layer, {"a": 5.0, "b": 1.0}, {"a": 2.0, "b": 1.0}) == {"a": 1.25, "b": 0.5}
    assert effective_lambdas(rel, {"a": 0.0}, {"a": 4.0}) == {"a": 0.5}  # no gradient at all: α as it is
    with pytest.raises(ValueError, match="lam_scale"):
        effective_lambdas(FisherConfig(lam_scale="bogus"), {"a": 1.0}, {"a": 1.0})
