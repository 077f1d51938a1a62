"""Layer-wise OBS (SparseGPT, OBC), Wanda and mask patterns, against brute-force float64 oracles."""

import copy

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from core.engine.curvature.base import FisherConfig
from core.engine.layerwise.hessian import Hessian, damped, input_columns
from core.engine.layerwise.obc import obc
from core.engine.layerwise.sequential import LayerwiseConfig, layer_groups
from core.engine.layerwise.sparsegpt import sparsegpt
from core.engine.layerwise.wanda import wanda
from core.engine.methods import Method, method_info
from core.engine.patterns import Pattern, as_matrix
from core.engine.pruner import make_pruner
from core.runs.spec import PruneSpec

DAMP = 0.01


def layer_problem(rows=3, cols=8, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g, dtype=torch.float64) @ torch.randn(
        cols, cols, generator=g, dtype=torch.float64
    )
    h = Hessian(cols, torch.float64)
    h.add(x[: n // 2])
    h.add(x[n // 2 :])
    return torch.randn(rows, cols, generator=g, dtype=torch.float64), h.h, x


def brute_force_obs(w, h, k, pattern):
    """Greedy OBS by enumeration: at each step the weight whose removal (with the optimal update of the rest of its
    row) gives the least total error (w' − w)ᵀH(w' − w), computed from scratch for every candidate set."""
    hinv = torch.linalg.inv(damped(h, DAMP))
    out, mask = w.clone(), torch.zeros_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        chosen: list[int] = []
        for _ in range(k):
            best, best_cost = None, None
            for q in range(w.shape[1]):
                if q in chosen:
                    continue
                if (
                    pattern.kind == "nm"
                    and sum(c // pattern.m == q // pattern.m for c in chosen) >= pattern.m - pattern.n
                ):
                    continue
                s = torch.tensor([*chosen, q])
                cost = w[r, s] @ torch.linalg.solve(hinv[s][:, s], w[r, s])
                if best_cost is None or cost < best_cost:
                    best, best_cost = q, cost
            chosen.append(best)
        s = torch.tensor(chosen)
        out[r] = w[r] - hinv[:, s] @ torch.linalg.solve(hinv[s][:, s], w[r, s])
        out[r, s] = 0
        mask[r, s] = True
    return out, mask


@pytest.mark.parametrize(
    "pattern,k", [(Pattern(), 3), (Pattern(), 6), (Pattern.parse("2:4"), 4), (Pattern.parse("2:4"), 3)]
)
def test_obc_equals_brute_force_greedy_obs(pattern, k):
    w, h, _ = layer_problem()
    sparsity = k / w.shape[1]
    new, mask, loss = obc(w, h, sparsity, pattern, damp=DAMP)
    ref, ref_mask = brute_force_obs(w, h, k, pattern)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new, ref, atol=1e-10, rtol=1e-10)
    dw = new - w  # the reported loss is ½ Σ_rows δwᵀHδw of the damped H
    torch.testing.assert_close(loss, 0.5 * float(((dw @ damped(h, DAMP)) * dw).sum()), atol=1e-9, rtol=1e-9)


def column_ordered_obs(w, h, prune):
    """SparseGPT's oracle for a given mask: columns left to right; a pruned weight is removed by the OBS update of
    the sub-problem of the columns not yet passed (explicit inverse of the trailing block of H, float64)."""
    hd = damped(h, DAMP)
    out = w.clone()
    for j in range(w.shape[1]):
        s = torch.linalg.inv(hd[j:, j:])
        for r in range(w.shape[0]):
            if prune[r, j]:
                out[r, j:] -= out[r, j] / s[0, 0] * s[:, 0]
    return out.masked_fill(prune, 0.0)


@pytest.mark.parametrize("blocksize", [1, 3, 128])
def test_sparsegpt_equals_column_ordered_obs_for_a_fixed_mask(blocksize):
    w, h, _ = layer_problem(rows=4, cols=9)
    prune = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    new, mask, _ = sparsegpt(w, h, 0.5, damp=DAMP, blocksize=blocksize, fixed=prune)
    assert torch.equal(mask, prune)
    torch.testing.assert_close(new, column_ordered_obs(w, h, prune), atol=1e-10, rtol=1e-10)


def test_sparsegpt_lazy_blocks_change_nothing_for_n_m():
    """N:M groups are chosen when their first column is reached, after every earlier error has been applied: the
    same masks and weights whatever the lazy block size (a multiple of M)."""
    w, h, _ = layer_problem(rows=5, cols=16)
    results = [sparsegpt(w, h, 0.5, Pattern.parse("2:4"), damp=DAMP, blocksize=b) for b in (4, 8, 128)]
    for new, mask, loss in results[1:]:
        assert torch.equal(mask, results[0][1])
        torch.testing.assert_close(new, results[0][0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(loss, results[0][2])


def test_sparsegpt_and_obc_agree_when_one_weight_per_row_is_pruned_from_the_first_column():
    """Pruning only column 0: SparseGPT's update over the columns not yet passed is the full OBS update, OBC's."""
    w, h, _ = layer_problem(rows=4, cols=6)
    prune = torch.zeros_like(w, dtype=torch.bool)
    prune[:, 0] = True
    sg, _, _ = sparsegpt(w, h, 0.0, damp=DAMP, fixed=prune)
    hinv = torch.linalg.inv(damped(h, DAMP))
    ref = w - (w[:, :1] / hinv[0, 0]) * hinv[0].unsqueeze(0)
    torch.testing.assert_close(sg, ref.masked_fill(prune, 0.0), atol=1e-10, rtol=1e-10)


def test_wanda_equals_its_closed_form():
    w, h, x = layer_problem(rows=6, cols=8, n=50)
    new, mask, _ = wanda(w, h, 0.5)
    scores = w.abs() * x.norm(dim=0)  # |W_ij| · ‖X_j‖₂ from the inputs themselves
    ref = torch.zeros_like(mask)
    ref.scatter_(1, scores.argsort(dim=1)[:, :4], True)
    assert torch.equal(mask, ref)
    assert torch.equal(new, w.masked_fill(ref, 0.0))


def test_conv_im2col_reproduces_the_convolution():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2), nn.Conv2d(3, 5, (3, 2), padding="same")):
        x = torch.randn(2, conv.in_channels, 7, 6)
        cols = input_columns(conv, x)
        w = as_matrix(conv.weight.detach())
        rows = w.shape[0] // conv.groups
        y = torch.cat([c @ w[g * rows : (g + 1) * rows].T for g, c in enumerate(cols)], dim=1)
        ref = (conv(x) - conv.bias.view(1, -1, 1, 1)).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
        torch.testing.assert_close(y, ref.detach(), atol=1e-5, rtol=1e-5)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))


@pytest.mark.parametrize("text", ["2:4", "4:8", "block:2x4", "block:4x4"])
@pytest.mark.parametrize("method", list(Method))
def test_patterns_hold_exactly_for_every_method(method, text):
    model, pattern = small_model().double(), Pattern.parse(text)
    x = torch.randn(64, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    names = [n for n, p in model.named_parameters() if n.endswith("weight")]
    info = method_info(method)
    pruner = make_pruner(
        method,
        FisherConfig(m=32, lam=1e-3),
        block_size=16,
        pattern=pattern,
        recompute=2,
        joint=info.supports_joint,
        dtype=torch.float64,
    )
    sparsity = pattern.fixed_sparsity or 0.5
    masks = pruner.prune(model, names, sparsity, (x, y))
    params = dict(model.named_parameters())
    for n in names:
        keep = as_matrix(masks[n])
        assert pattern.holds(keep)
        assert torch.all(as_matrix(params[n])[keep == 0] == 0)
        if pattern.kind == "nm":  # exactly M − N pruned in every group of M
            assert torch.all((keep.reshape(keep.shape[0], -1, pattern.m) == 0).sum(-1) == pattern.m - pattern.n)
    pruned = sum(int((m == 0).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert pruned == pytest.approx(0.5, abs=0.05)  # per layer, or over all layers (global scope), in whole tiles


def test_sequential_calibration_sees_the_pruned_earlier_layers():
    """Layer 2's Hessian comes from layer 1's *pruned* outputs: re-pruning layer 2 from the dense model's layer-1
    outputs gives different weights, from the pruned ones the same."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).double()
    x = torch.randn(100, 6, dtype=torch.float64)
    model = copy.deepcopy(dense)
    make_pruner("sparsegpt", layerwise=LayerwiseConfig(batch=7)).prune(model, ["0.weight", "2.weight"], 0.5, (x, None))

    def layer2_from(first):
        h = Hessian(12, torch.float64)
        h.add(torch.relu(first(x)).detach())
        return sparsegpt(dense[2].weight.detach(), h.h, 0.5, damp=0.01)[0]

    torch.testing.assert_close(model[2].weight.detach(), layer2_from(model[0]), atol=1e-10, rtol=1e-10)
    assert not torch.allclose(model[2].weight.detach(), layer2_from(dense[0]), atol=1e-4)


def test_transformer_blocks_are_grouped_and_calibrated_in_order():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, h):
            return h + self.out(torch.tanh(self.q(h)) * self.k(h))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.layers = nn.ModuleList([Block() for _ in range(3)])
            self.head = nn.Linear(8, 2)

        def forward(self, ids):  # int64 input: the pruner only passes it through
            h = self.embed(ids)
            for layer in self.layers:
                h = layer(h)
            return self.head(h.mean(1))

    torch.manual_seed(0)
    net = Net()
    names = [n for n, p in net.named_parameters() if n.endswith("weight") and "embed" not in n]
    ids = torch.randint(0, 20, (10, 5))
    groups = layer_groups(net, names, ids[:1])
    assert groups == [[f"layers.{i}.q", f"layers.{i}.k", f"layers.{i}.out"] for i in range(3)] + [["head"]]
    masks = make_pruner("wanda", pattern="2:4").prune(net, names, 0.5, (ids, None))
    assert all(Pattern.parse("2:4").holds(m) for m in masks.values())


def test_spec_pattern_fixes_the_sparsity():
    assert PruneSpec(method="sparsegpt", pattern="2:4").sparsity == 0.5
    assert PruneSpec(method="sparsegpt", pattern="4:8", sparsity=0.5).pattern == "4:8"
    assert PruneSpec(method="wanda", pattern="block:4x4", sparsity=0.7).pattern == "block:4x4"
    with pytest.raises(ValidationError, match=r"pattern 2:4 fixes sparsity at 0\.5"):
        PruneSpec(method="sparsegpt", pattern="2:4", sparsity=0.7)
    for bad in ("3:2", "2:4:8", "block:4", "block:0x4", "banana"):
        with pytest.raises(ValidationError, match="pattern"):
            PruneSpec(method="magnitude", sparsity=0.5, pattern=bad)
    with pytest.raises(ValidationError):  # a pattern that fixes nothing needs its sparsity
        PruneSpec(method="wanda", pattern="block:4x4")
    with pytest.raises(ValidationError, match="obc is per layer"):
        PruneSpec(method="obc", sparsity=0.5, scope="global")


def test_every_layerwise_method_is_label_and_gradient_free():
    for method in (Method.SPARSEGPT, Method.OBC, Method.WANDA):
        info = method_info(method)
        assert info.layerwise is not None and not info.needs_labels and not info.needs_gradients and info.needs_data


def test_reconstruction_order_on_inputs_with_outlier_features():
    """Inputs whose features differ in scale (what Wanda is built for): OBC ≤ SparseGPT < Wanda < magnitude in the
    layer's output error ‖(W' − W)X‖² on the calibration inputs. The dampening is kept below the smallest feature's
    variance (the default 1 % of the mean diagonal would swamp features 100× smaller than the largest)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 32, generator=g, dtype=torch.float64) * 10 ** torch.empty(32, dtype=torch.float64).uniform_(
        -1, 1, generator=g
    )
    w = torch.randn(16, 32, generator=g, dtype=torch.float64)
    h = Hessian(32, torch.float64)
    h.add(x)
    err = {
        name: float(((x @ (fn(w, h.h, 0.5, **kw)[0] - w).T) ** 2).mean())
        for name, fn, kw in [
            ("sparsegpt", sparsegpt, {"damp": 1e-4}),
            ("obc", obc, {"damp": 1e-4}),
            ("wanda", wanda, {}),
        ]
    }
    mag = w.masked_fill(w.abs() <= w.abs().median(dim=1, keepdim=True).values, 0.0)
    magnitude = float(((x @ (mag - w).T) ** 2).mean())
    assert err["obc"] <= err["sparsegpt"] * 1.05 and err["sparsegpt"] < err["wanda"] < magnitude


@pytest.mark.parametrize("solver", [sparsegpt, obc, wanda])
def test_n_m_below_its_sparsity_keeps_the_pattern_and_the_masks_nest(solver):
    """A gradual schedule's earlier steps under 2:4 (targets below 50 %): round(s · cols) pruned per row, at most
    2 in any group of 4; the next step keeps them and the last reaches exactly 2 per group."""
    w, h, _ = layer_problem(rows=6, cols=16, n=64)
    nm = Pattern.parse("2:4")
    masks, weights = [], w
    for target in (0.25, 0.375, 0.5):
        weights, mask, _ = solver(weights, h, target, nm, pruned=masks[-1] if masks else None)
        per_group = mask.reshape(6, 4, 4).sum(-1)
        assert torch.all(mask.sum(1) == round(target * 16)) and torch.all(per_group <= 2)
        assert torch.all(weights[mask] == 0)
        if masks:
            assert torch.all(mask >= masks[-1])  # nested: what was pruned stays pruned
        masks.append(mask)
    assert torch.all(masks[-1].reshape(6, 4, 4).sum(-1) == 2)
