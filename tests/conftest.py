"""Fixtures shared by all tests (small trained models, the digits data) and the `slow` marking behind
`make test-fast`."""

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from core.runs.speed import LatencyConfig, set_default_latency

# Every job measures its dense and pruned latency (core.runs.speed); the suite runs hundreds of jobs, so briefly:
# in this process (runs given no LatencyConfig) and in the workers it starts (Settings from the environment).
set_default_latency(LatencyConfig(budget_s=0.1))
os.environ.setdefault("ARBORIST_LATENCY_BUDGET_S", "0.1")

SLOW_DIRS = (Path(__file__).parent / "e2e", Path(__file__).parent / "dashboard")  # real server, worker, browser


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks every test under ``SLOW_DIRS`` ``e2e`` and ``slow`` (``make test-fast`` runs ``-m "not slow"``)."""
    for item in items:
        if any(d in item.path.parents for d in SLOW_DIRS):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny tensors on busy shared cores, where a second thread only contends
    (measured here: a structured prune of a small ResNet-20 took 0.23 s on one thread and 20 s on two at load 17)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def digits():
    from core.io.data import builtin_dataset

    return builtin_dataset("digits").split(0.2, 0)


@pytest.fixture(scope="session")
def digits_mlp_state(digits):
    """A digits MLP (64-32-10) trained for a few epochs: its state dict."""
    from core.io.zoo import build_model
    from core.runs.spec import FinetuneSpec
    from core.runs.train import make_optimizer, train_epoch

    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[32], num_classes=10)
    opt = make_optimizer(model, FinetuneSpec(optimizer="adam", lr=1e-2))
    for e in range(15):
        train_epoch(
            model,
            digits.x_train,
            digits.y_train,
            opt,
            loss="cross_entropy",
            batch_size=64,
            masks={},
            generator=torch.Generator().manual_seed(e),
        )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def digits_mlp(digits_mlp_state):
    from core.io.zoo import build_model

    model = build_model("mlp", in_features=64, hidden=[32], num_classes=10)
    model.load_state_dict(digits_mlp_state)
    return model
