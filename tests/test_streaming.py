"""Issue #15: the streamed Fisher (Gram matrices accumulated per chunk) gives the buffered path's numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core.engine.curvature.base import FisherConfig
from core.engine.curvature.fisher import WoodFisher
from core.engine.curvature.inverse import DenseInverse, WoodburyInverse
from core.engine.layout import BlockLayout, select_parameters
from core.engine.phases import reporting
from core.engine.pruner import make_pruner


def _prune(task, method: str, path: str, *, chunk: int, block: int | None, m: int, recompute: int = 3, **cfg):
    model, x, y = task
    model = copy.deepcopy(model)
    names = select_parameters(model)
    fisher = FisherConfig(m=m, lam=1e-4, chunk=chunk, path=path, seed=5, **cfg)
    pruner = make_pruner(method, fisher, block_size=block, joint=True, recompute=recompute, dtype=torch.float64)
    masks = pruner.prune(model, names, 0.7, (x, y))
    return masks, {n: p.detach().clone() for n, p in model.named_parameters()}, pruner


@pytest.mark.parametrize("method", ["woodfisher", "woodtaylor"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 500])
def test_streamed_gives_the_buffered_masks_and_weights(tiny_task, method, chunk):
    """c ≤ m (blocks of 7, padded last blocks), float64: the same masks, weights and predicted loss changes."""
    ref_masks, ref_weights, ref = _prune(tiny_task, method, "buffered", chunk=64, block=7, m=200)
    masks, weights, got = _prune(tiny_task, method, "streamed", chunk=chunk, block=7, m=200)
    for n in ref_masks:
        assert torch.equal(masks[n], ref_masks[n]), n
    for n in ref_weights:
        torch.testing.assert_close(weights[n], ref_weights[n], rtol=1e-9, atol=1e-12)
    assert [s.predicted_loss_change for s in got.log] == pytest.approx(
        [s.predicted_loss_change for s in ref.log], rel=1e-8
    )
    assert sum(int((m == 0).sum()) for m in masks.values()) > 0


def test_streamed_mixes_dense_and_woodbury_layers_and_layer_groups(tiny_task):
    """Whole-layer blocks with m = 40: the 60-weight first layer is Woodbury (c > m, buffered rows), the 30-weight
    second dense (streamed Gram); two layer groups (two passes over the same samples) change nothing."""
    model, x, y = tiny_task
    names = select_parameters(model)
    layout = BlockLayout.for_model(model, names, None)
    mask = torch.ones(layout.width, dtype=torch.float64)
    mask[::3] = 0
    est = {
        path: WoodFisher(FisherConfig(m=40, lam=1e-3, path=path, chunk=9, groups=groups), None, taylor=True)
        for path, groups in [("buffered", None), ("streamed", [[names[1]], [names[0]]])]
    }
    ref = est["buffered"].estimate(model, layout, mask, (x, y))
    got = est["streamed"].estimate(model, layout, mask, (x, y))
    assert got.info["path"] == "streamed" and ref.info["path"] == "buffered"
    assert [type(s.inv) for s in got.segments] == [WoodburyInverse, DenseInverse]
    torch.testing.assert_close(got.grad, ref.grad, rtol=1e-10, atol=1e-14)
    v = torch.randn(layout.width, dtype=torch.float64)
    for a, b in zip(got.segments, ref.segments, strict=True):
        torch.testing.assert_close(a.inv.diag(), b.inv.diag())
        torch.testing.assert_close(a.inv.matvec(a.view(v)), b.inv.matvec(b.view(v)))


def test_streamed_blocks_are_the_inverse_of_the_explicit_fisher():
    """Oracle: F_b = λI + (1/m) Σᵢ gᵢgᵢᵀ over explicit per-example gradients (a backward loop), inverted in float64."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(50, 5, dtype=torch.float64), torch.randint(0, 3, (50,))
    names = select_parameters(model)
    layout = BlockLayout.for_model(model, names, 6)
    mask = torch.ones(layout.width, dtype=torch.float64)
    mask[4] = 0
    lam, m = 1e-2, 30
    cur = WoodFisher(FisherConfig(m=m, lam=lam, path="streamed", chunk=4, seed=2), 6).estimate(
        model, layout, mask, (x, y)
    )
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(2))[:m]
    params = dict(model.named_parameters())
    rows = []
    for i in idx:
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(layout.flatten({n: params[n].grad for n in names}) * mask)
    g = torch.stack(rows)
    for layer, seg in zip(layout.layers, cur.segments, strict=True):
        gb = layer.blocks(g).movedim(0, 1)  # (nb, m, c)
        f = lam * torch.eye(layer.block, dtype=torch.float64) + gb.mT @ gb / m
        torch.testing.assert_close(seg.inv.inv, torch.linalg.inv(f))


def test_engine_reports_its_phases(tiny_task):
    seen: list[str] = []

    def hook(name: str):
        seen.append(name)
        return __import__("contextlib").nullcontext()

    with reporting(hook):
        _prune(tiny_task, "woodfisher", "streamed", chunk=50, block=7, m=100, recompute=1)
    assert {"curvature", "gradients", "gram", "inverse", "obs"} <= set(seen)
    seen.clear()
    _prune(tiny_task, "woodfisher", "streamed", chunk=50, block=7, m=100, recompute=1)
    assert seen == []  # without a hook nothing is reported


def test_half_precision_buffer_is_accumulated_in_float32(tiny_task):
    """The buffered path with a bfloat16 gradient buffer: inverses in the run's dtype, close to the float32 ones."""
    model, x, y = tiny_task
    model = copy.deepcopy(model).float()
    x = x.float()
    names = select_parameters(model)
    layout = BlockLayout.for_model(model, names, None)
    mask = torch.ones(layout.width)
    full = WoodFisher(FisherConfig(m=20, lam=1e-2, path="buffered"), None).estimate(model, layout, mask, (x, y))
    half = WoodFisher(FisherConfig(m=20, lam=1e-2, path="buffered", buffer_dtype=torch.bfloat16), None).estimate(
        model, layout, mask, (x, y)
    )
    for a, b in zip(half.segments, full.segments, strict=True):
        assert a.inv.diag().dtype == torch.float32
        torch.testing.assert_close(a.inv.diag(), b.inv.diag(), rtol=2e-2, atol=1e-2)
