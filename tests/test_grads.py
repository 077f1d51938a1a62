"""vmap(grad) Fisher samples against an explicit per-example backward loop."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.engine.buffers import large_empty
from core.engine.grads import fisher_gradients
from core.engine.layout import BlockLayout, select_parameters


def loop_grads(model, names, xs, ys):
    params = dict(model.named_parameters())
    rows = []
    for xb, yb in zip(xs, ys):
        model.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        rows.append(torch.cat([params[n].grad.flatten() for n in names]))
    return torch.stack(rows)


def test_per_example_and_minibatch_gradients_match_a_loop(tiny_task):
    model, x, y = tiny_task
    names = select_parameters(model)
    layout = BlockLayout.for_model(model, names, 7)  # padded blocks
    for b in (1, 4):
        gen = torch.Generator().manual_seed(3)
        out = fisher_gradients(model, layout, x, y, m=25, fisher_batch=b, generator=gen, chunk=10)
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))[: 25 * b]
        expect = loop_grads(model, names, x[idx].unflatten(0, (25, b)), y[idx].unflatten(0, (25, b)))
        got = torch.stack([torch.cat([layout.unflatten(r)[n].flatten() for n in names]) for r in out.grads])
        assert torch.allclose(got, expect, atol=1e-12)
        assert torch.all(out.grads[:, ~layout.valid()] == 0)  # padding stays zero
        assert torch.allclose(out.mean, out.grads.mean(0))


def test_gradients_are_masked(tiny_task):
    model, x, y = tiny_task
    names = select_parameters(model)
    layout = BlockLayout.for_model(model, names, None)
    mask = (torch.rand(layout.width, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    out = fisher_gradients(model, layout, x, y, m=10, mask=mask)
    assert torch.all(out.grads[:, mask == 0] == 0)
    assert torch.any(out.grads[:, mask == 1] != 0)


def test_true_fisher_samples_labels_from_the_model(tiny_task):
    model, x, y = tiny_task
    layout = BlockLayout.for_model(model, select_parameters(model), None)
    emp = fisher_gradients(model, layout, x, y, m=50)
    true = fisher_gradients(model, layout, x, y, m=50, true_fisher=True)
    assert not torch.allclose(emp.grads, true.grads)
    # labels from a confident model mostly agree with the data: the two Fishers are close in scale
    ratio = float(true.grads.square().sum() / emp.grads.square().sum())
    assert 0.2 < ratio < 5


def test_too_many_samples_is_an_error(tiny_task):
    model, x, y = tiny_task
    layout = BlockLayout.for_model(model, select_parameters(model), None)
    with pytest.raises(ValueError, match="800"):
        fisher_gradients(model, layout, x, y, m=400, fisher_batch=2)


def test_large_empty_is_a_plain_tensor_backed_by_huge_pages():
    small = large_empty(3, 5, dtype=torch.float64, device="cpu")
    assert small.shape == (3, 5) and small.dtype == torch.float64
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages on this kernel")
    # in a fresh process: in a long-lived one the allocator may hand back memory already touched in 4 KiB pages,
    # which the advice cannot change (it is advisory, and only first touch decides)
    probe = """
import torch
from pathlib import Path
from core.engine.buffers import large_empty

def anon_huge_kb():
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0

before = anon_huge_kb()
big = large_empty(64, 1 << 16, dtype=torch.float32, device="cpu")  # 16 MiB
big.fill_(1.5)
assert float(big.sum()) == 1.5 * big.numel()
print(anon_huge_kb() - before)
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= 8 * 1024  # at least half of it in 2 MiB pages


def test_per_sample_loop_for_models_vmap_cannot_trace_matches_autograd(caplog):
    """Data-dependent control flow makes vmap fail; the loop that replaces it writes each sample's gradients into
    the chunk's (k, ...) tensors, equal to autograd's per sample (float64)."""
    from torch.func import functional_call

    from core.engine.grads import per_sample_gradients

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 7).double(), nn.Linear(7, 3).double()

        def forward(self, x):
            h = self.a(x)
            if bool(h.sum() > 0):  # vmap cannot trace this
                h = h * 2.0
            return self.b(torch.tanh(h))

    torch.manual_seed(0)
    model = Branchy()
    xs, ys = torch.randn(6, 1, 5, dtype=torch.float64), torch.randint(0, 3, (6, 1))
    sel = {n: p.detach() for n, p in model.named_parameters() if n.endswith("weight")}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in sel}

    def loss(s, xb, yb):
        return F.cross_entropy(functional_call(model, (s, fixed), (xb,)), yb)

    with caplog.at_level("INFO", logger="core.engine.grads"):
        out = per_sample_gradients(loss)(sel, xs, ys)
    assert "per-example gradients in a loop" in caplog.text  # the loop, not vmap, made these
    for i in range(len(xs)):
        model.zero_grad()
        F.cross_entropy(model(xs[i]), ys[i]).backward()
        for n, p in model.named_parameters():
            if n in sel:
                assert out[n].shape == (6, *p.shape) and out[n].is_contiguous()
                torch.testing.assert_close(out[n][i], p.grad, rtol=1e-12, atol=1e-14)
