"""Every method through the Pruner interface on a tiny trained MLP."""

import copy
import itertools

import pytest
import torch

from core.engine.curvature.base import FisherConfig
from core.engine.curvature.fisher import WoodFisher
from core.engine.curvature.hessian import ExactHessian
from core.engine.layout import BlockLayout, select_parameters
from core.engine.methods import Method, method_info
from core.engine.obs import saliency
from core.engine.pruner import make_pruner, substep_targets


def spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def zeros_per_layer(model, names):
    params = dict(model.named_parameters())
    return {n: int((params[n] == 0).sum()) for n in names}


@pytest.mark.parametrize("method", list(Method))
def test_every_method_reaches_the_sparsity_exactly(tiny_task, method):
    model, x, y = tiny_task
    model = copy.deepcopy(model)
    names = select_parameters(model)
    joint = method_info(method).supports_joint
    pruner = make_pruner(method, FisherConfig(m=200, lam=1e-4), block_size=16, joint=joint, dtype=torch.float64)
    masks = pruner.prune(model, names, 0.6, (x, y))
    params = dict(model.named_parameters())
    sizes = {n: params[n].numel() for n in names}
    zeros = zeros_per_layer(model, names)
    for n in names:  # pruned weights are exactly zero and the mask says so
        assert torch.equal(params[n] == 0, masks[n] == 0)
    if method is Method.MAGNITUDE:
        assert all(zeros[n] == round(0.6 * sizes[n]) for n in names)
    elif method_info(method).layerwise:  # per row of every layer (SparseGPT: per row of each column block)
        shapes = {n: params[n].flatten(1).shape for n in names}
        assert all(zeros[n] == shapes[n][0] * round(0.6 * shapes[n][1]) for n in names)
    else:
        assert sum(zeros.values()) == round(0.6 * sum(sizes.values()))


def test_huge_lambda_is_exactly_magnitude_pruning(tiny_task):
    model, x, y = tiny_task
    names = select_parameters(model)
    for scope, baseline in (("layer", Method.MAGNITUDE), ("global", Method.GLOBAL_MAGNITUDE)):
        runs = {}
        for method in (Method.WOODFISHER, baseline):
            m = copy.deepcopy(model)
            pruner = make_pruner(method, FisherConfig(m=100, lam=1e10), block_size=8, scope=scope, dtype=torch.float64)
            runs[method] = pruner.prune(m, names, 0.5, (x, y))
        for n in names:
            assert torch.equal(runs[Method.WOODFISHER][n], runs[baseline][n])


def test_full_block_woodfisher_ranks_like_exact_obs(tiny_task):
    model, x, y = tiny_task
    names = select_parameters(model)
    layout = BlockLayout.for_model(model, names, None)
    mask = torch.ones(layout.width, dtype=torch.float64)
    w = layout.flatten({n: p.detach() for n, p in model.named_parameters() if n in names})
    wf = WoodFisher(FisherConfig(m=600, lam=1e-6), None).estimate(model, layout, mask, (x, y))
    ex = ExactHessian(lam=1e-6).estimate(model, layout, mask, (x, y))
    s_wf, _ = saliency(w, wf.segments)
    s_ex, _ = saliency(w, ex.segments)
    assert spearman(s_wf, s_ex) > 0.9
    assert spearman(s_wf, s_ex) > spearman(w.square(), s_ex) + 0.2  # far closer than magnitude


def test_recompute_substeps_keep_masks_nested(tiny_task):
    model, x, y = tiny_task
    model = copy.deepcopy(model)
    names = select_parameters(model)
    pruner = make_pruner("woodfisher", FisherConfig(m=100, lam=1e-4), block_size=16, recompute=3, dtype=torch.float64)
    first = pruner.prune(model, names, 0.3, (x, y))
    second = pruner.prune(model, names, 0.75, (x, y), masks=first)
    # geometric in the density: each sub-step keeps the same fraction of what was alive
    # (0.7^(1/3) per sub-step to 30 %, then (0.25/0.7)^(1/3) to 75 %)
    expected = [1 - 0.7 ** (1 / 3), 1 - 0.7 ** (2 / 3), 0.3]
    expected += [1 - 0.7 * (0.25 / 0.7) ** (1 / 3), 1 - 0.7 * (0.25 / 0.7) ** (2 / 3), 0.75]
    assert [s.sparsity for s in pruner.log] == pytest.approx(expected, abs=1e-12)
    for n in names:
        assert torch.all(second[n][first[n] == 0] == 0)
    total = sum(m.numel() for m in second.values())
    assert sum(int((m == 0).sum()) for m in second.values()) == round(0.75 * total)


def test_woodfisher_beats_magnitude_on_the_tiny_task(tiny_task):
    """With a moderate λ, or with recompute sub-steps, OBS loses far less than magnitude at 50 %."""
    model, x, y = tiny_task
    names = select_parameters(model)

    def loss_after(method, lam, recompute):
        m = copy.deepcopy(model)
        cfg = FisherConfig(m=600, lam=lam)
        pruner = make_pruner(method, cfg, block_size=None, joint=True, recompute=recompute, dtype=torch.float64)
        pruner.prune(m, names, 0.5, (x, y))
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(m(x), y))

    magnitude = loss_after("global_magnitude", 1.0, 1)
    assert loss_after("woodfisher", 1e-2, 1) < 0.6 * magnitude
    assert loss_after("woodfisher", 1e-4, 5) < 0.5 * magnitude


def test_substeps_remove_the_same_fraction_of_what_is_alive():
    targets = substep_targets(0.2, 0.95, 16)
    assert targets[-1] == 0.95 and len(targets) == 16
    densities = [0.8] + [1 - t for t in targets]
    kept = [b / a for a, b in itertools.pairwise(densities)]
    assert max(kept) - min(kept) < 1e-12  # every sub-step keeps (0.05 / 0.8)^(1/16) ≈ 84 % of what was alive
    assert substep_targets(0.5, 0.5, 3) == [0.5, 0.5, 0.5]  # nothing left to prune: the target stays
