"""A gradient chunk's activations in the memory plan (``core.engine.activations``): counted on the ``meta`` device,
and the plan of a convolutional step that holds mostly activations is an upper bound of its measured peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from core.engine.activations import saved_bytes_per_sample
from core.engine.memory import plan
from core.engine.methods import Method

ROOT = Path(__file__).resolve().parents[1]


def _convnet(size: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * size**2, 2)
    )


def test_saved_bytes_count_each_saved_activation_once_and_only_for_the_differentiated_layers():
    """Both convolutions differentiated: conv 1 saves its input (3 × 8 × 8 floats) for its weight's gradient; ReLU
    saves its output, which conv 2 saves as its input: one 4 × 8 × 8 tensor, counted once. Only conv 2: nothing
    upstream of it needs a backward, so only its input. Weights are never counted; a batch of 2 saves twice as
    much."""
    model = _convnet()
    x = torch.randn(1, 3, 8, 8)
    assert saved_bytes_per_sample(model, x, ["0.weight", "2.weight"]) == (3 + 4) * 64 * 4
    assert saved_bytes_per_sample(model, x, ["2.weight"]) == 4 * 64 * 4
    assert saved_bytes_per_sample(model, torch.randn(2, 3, 8, 8), ["2.weight"]) == 2 * 4 * 64 * 4
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model itself is untouched


def test_a_forward_that_needs_real_values_is_not_counted():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if bool(x.sum() > 0) else -self.fc(x)  # data-dependent: no meta run

    assert saved_bytes_per_sample(Branchy(), torch.randn(1, 4), ["fc.weight"]) is None


# --- measured in a fresh child process ----------------------------------------------------------------------------

CASE = {"size": 64, "width": 16, "m": 64, "chunk": 32, "block": 64}


def _child() -> dict:
    from core.engine.buffers import map_large_allocations
    from core.engine.curvature.base import FisherConfig
    from core.engine.curvature.hessian import release_free_memory
    from core.engine.pruner import make_pruner
    from test_memory_plans import _peak_of  # the VmHWM probe (tests/ is the script's directory)

    torch.set_num_threads(1)
    map_large_allocations()
    s, w = CASE["size"], CASE["width"]

    def step():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(w * s * s, 10),
        )  # fmt: skip
        data = (torch.randn(2 * CASE["m"], 3, s, s), torch.randint(0, 10, (2 * CASE["m"],)))
        fisher = FisherConfig(m=CASE["m"], lam=1e-3, chunk=CASE["chunk"], path="streamed")
        return model, data, make_pruner("woodfisher", fisher, block_size=CASE["block"])

    names = ["0.weight", "2.weight"]  # the convolutions: 2,736 weights; their samples' activations are 0.5 MiB each
    model, data, pruner = step()
    pruner.prune(model, names, 0.5, data)  # warm-up
    del model, data, pruner
    release_free_memory()
    model, data, pruner = step()
    activations = saved_bytes_per_sample(model, data[0][:1], names)
    measured = _peak_of(lambda: pruner.prune(model, names, 0.5, data))
    return {"measured": measured, "activations": activations}


def test_plan_of_a_conv_step_bounds_its_peak_only_with_the_activations():
    """Two 3 × 3 convolutions on 64 × 64 images, streamed WoodFisher at m = 64, k = 32: their gradients are 0.3 MiB
    a chunk, their activations 17.5 MiB. Without the activations the plan (a few MiB) is a fraction of the measured
    peak; with them it is an upper bound within 1.5× (measured 52.1 MiB, planned 61.7 MiB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    w = CASE["width"]
    shapes = {"0.weight": (w, 3, 3, 3), "2.weight": (w, w, 3, 3)}
    kw = {"chunk": CASE["chunk"], "path": "streamed"}
    blind = plan(Method.WOODFISHER, shapes, CASE["block"], CASE["m"], 4, **kw).total_bytes
    seeing = plan(Method.WOODFISHER, shapes, CASE["block"], CASE["m"], 4, activations=result["activations"], **kw)
    measured = result["measured"]
    print(f"measured {measured / 2**20:.1f} MiB; plan {seeing.total_bytes / 2**20:.1f}, blind {blind / 2**20:.1f}")
    assert seeing.activations == result["activations"] == 2 * w * CASE["size"] ** 2 * 4 + 3 * CASE["size"] ** 2 * 4
    assert blind < measured / 4
    assert 1 / 1.5 <= measured / seeing.total_bytes <= 1.0, (measured, seeing.total_bytes)


if __name__ == "__main__":
    print(json.dumps(_child()))
