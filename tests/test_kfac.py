"""K-FAC factor ordering against the exact Fisher block of Linear and Conv2d layers."""

import pytest
import torch
from torch import nn

from core.engine.curvature.base import FisherConfig
from core.engine.curvature.kfac import KroneckerInverse, kfac_factors
from core.engine.grads import fisher_gradients
from core.engine.layout import BlockLayout


def exact_fisher(model, name, x, y):
    layout = BlockLayout.for_model(model, [name], None)
    g = fisher_gradients(model, layout, x, y, m=len(x)).grads
    return g.T @ g / len(x)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def conv_model(kernel):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, kernel), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()


CASES = [("linear", linear_model, "0.weight", (5,)), ("conv 1x1 output", lambda: conv_model(4), "0.weight", (2, 4, 4))]


@pytest.mark.parametrize("label,make,name,shape", CASES)
def test_one_example_kfac_is_exactly_b_kron_a(label, make, name, shape):
    model = make()
    x = torch.randn(1, *shape, dtype=torch.float64)
    model(x)  # materialise lazy layers
    y = torch.tensor([1])
    b, a = kfac_factors(model, [name], x, y, FisherConfig(m=1))[name]
    exact = exact_fisher(model, name, x, y)
    assert rel(torch.kron(b, a), exact) < 1e-12
    assert rel(torch.kron(a, b), exact) > 0.1  # the reviewers' A⊗B ordering mistake


@pytest.mark.parametrize(
    "label,make,name,shape", [*CASES, ("conv 3x3 output", lambda: conv_model(2), "0.weight", (2, 4, 4))]
)
def test_kfac_order_approximates_the_exact_block(label, make, name, shape):
    model = make()
    torch.manual_seed(1)
    x = torch.randn(64, *shape, dtype=torch.float64)
    model(x)
    y = torch.randint(0, 3, (64,))
    b, a = kfac_factors(model, [name], x, y, FisherConfig(m=64, chunk=16))[name]
    exact = exact_fisher(model, name, x, y)
    assert rel(torch.kron(b, a), exact) < rel(torch.kron(a, b), exact)
    assert torch.allclose(torch.trace(torch.kron(b, a)), torch.trace(exact), rtol=0.5)


def test_kronecker_inverse_matches_the_dense_inverse():
    torch.manual_seed(2)
    p, q = torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    b, a = p @ p.T / 6, q @ q.T / 9
    lam = 0.1
    inv = KroneckerInverse.from_factors(b, a, lam)
    dense = torch.linalg.inv(torch.kron(b, a) + lam * torch.eye(20, dtype=torch.float64))
    assert rel(inv.diag()[0], dense.diagonal()) < 1e-10
    v = torch.randn(1, 20, dtype=torch.float64)
    assert rel(inv.matvec(v)[0], dense @ v[0]) < 1e-10
