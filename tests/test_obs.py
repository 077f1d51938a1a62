"""OBS step against closed forms on quadratic losses with the true Hessian."""

import pytest
import torch

from core.engine.curvature.inverse import DenseInverse, Segment
from core.engine.layout import BlockLayout
from core.engine.obs import obs_step, saliency


def quadratic(n=12, seed=0):
    torch.manual_seed(seed)
    a = torch.randn(n, n, dtype=torch.float64)
    h = a @ a.T + 0.5 * torch.eye(n, dtype=torch.float64)
    w_star = torch.randn(n, dtype=torch.float64)

    def loss(w):
        return 0.5 * (w - w_star) @ h @ (w - w_star)

    return h, w_star, loss


def constrained_minimum(h, w_star, w, pruned):
    """argmin ½(v − w*)ᵀH(v − w*) subject to v_Q = 0, by solving on the free coordinates."""
    free = ~pruned
    v = torch.zeros_like(w)
    # stationarity on free coords: H_ff (v_f − w*_f) + H_fQ (0 − w*_Q) = 0
    v[free] = w_star[free] + torch.linalg.solve(h[free][:, free], h[free][:, pruned] @ w_star[pruned])
    return v


def setup(n, h):
    layout = BlockLayout({"w": (n,)}, None)
    return layout, [Segment(0, DenseInverse(torch.linalg.inv(h).unsqueeze(0)))]


def test_joint_obs_update_is_the_constrained_minimiser():
    n = 12
    h, w_star, loss = quadratic(n)
    layout, segs = setup(n, h)
    mask = torch.ones(n, dtype=torch.float64)
    res = obs_step(w_star.clone(), mask, segs, layout, 0.5, joint=True)
    pruned = res.mask == 0
    assert int(pruned.sum()) == 6
    expect = constrained_minimum(h, w_star, w_star, pruned)
    assert torch.allclose(res.weights, expect, atol=1e-10)
    # the quadratic model is exact here: predicted = actual loss change
    assert res.predicted_loss_change == pytest.approx(float(loss(res.weights) - loss(w_star)), rel=1e-9)


def test_joint_update_beats_summed_update():
    n = 16
    for seed in range(5):
        h, w_star, loss = quadratic(n, seed)
        layout, segs = setup(n, h)
        mask = torch.ones(n, dtype=torch.float64)
        joint = obs_step(w_star.clone(), mask, segs, layout, 0.4, joint=True)
        summed = obs_step(w_star.clone(), mask, segs, layout, 0.4, joint=False)
        assert torch.equal(joint.mask, summed.mask)
        assert float(loss(joint.weights)) <= float(loss(summed.weights)) + 1e-12
        assert torch.all(summed.weights[summed.mask == 0] == 0)


def test_single_weight_cost_is_its_saliency():
    """Pruning one weight costs exactly ρ_q = w_q²/(2[H⁻¹]_qq), and OBS picks the cheapest."""
    n = 10
    h, w_star, loss = quadratic(n, 3)
    layout, segs = setup(n, h)
    scores, _ = saliency(w_star, segs)
    res = obs_step(w_star.clone(), torch.ones(n, dtype=torch.float64), segs, layout, 1 / n, joint=True)
    q = int((res.mask == 0).nonzero())
    assert q == int(scores.argmin())
    assert float(loss(res.weights)) == pytest.approx(float(scores[q]), rel=1e-9)


def test_woodtaylor_off_the_minimum_is_exact_for_a_quadratic():
    n = 12
    h, w_star, loss = quadratic(n, 4)
    layout, segs = setup(n, h)
    w = w_star + 0.3 * torch.randn(n, dtype=torch.float64)
    grad = h @ (w - w_star)
    res = obs_step(w.clone(), torch.ones(n, dtype=torch.float64), segs, layout, 0.5, joint=True, grad=grad)
    expect = constrained_minimum(h, w_star, w, res.mask == 0)
    assert torch.allclose(res.weights, expect, atol=1e-10)
    assert res.predicted_loss_change == pytest.approx(float(loss(res.weights) - loss(w)), rel=1e-9)


def test_already_pruned_weights_stay_pruned_and_count():
    n = 20
    h, w_star, _ = quadratic(n, 5)
    layout, segs = setup(n, h)
    mask = torch.ones(n, dtype=torch.float64)
    mask[:5] = 0
    w = w_star.clone() * mask
    res = obs_step(w, mask, segs, layout, 0.5, joint=True)
    assert torch.all(res.mask[:5] == 0) and int((res.mask == 0).sum()) == 10
    assert torch.all(res.weights[res.mask == 0] == 0)
