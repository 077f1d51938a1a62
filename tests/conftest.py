import pytest
import torch
from torch import nn


@pytest.fixture
def tiny_task():
    """A small MLP trained to convergence on a noisy synthetic task (float64).

    Near a minimum of a well-specified problem the empirical Fisher approximates the Hessian, which
    is the premise of WoodFisher (paper, §3).
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 6, generator=g, dtype=torch.float64)
    w_true = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = (x @ w_true + torch.randn(600, 3, generator=g, dtype=torch.float64)).argmax(-1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(1000):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y
