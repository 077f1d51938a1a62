"""The method table: one entry per method, and the pruner, the spec and the memory plan all obey it."""

import itertools

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from core.engine.curvature.base import FisherConfig
from core.engine.layout import BlockLayout, select_parameters
from core.engine.memory import fit, plan
from core.engine.methods import METHODS, Method, Sizing, method_info
from core.engine.obs import Scope
from core.engine.pruner import make_pruner
from core.errors import DoesNotFit
from core.runs.spec import PruneSpec


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()  # weights (6, 4) and (2, 6)


def test_every_method_has_one_consistent_entry():
    assert set(METHODS) == set(Method)
    for method, info in METHODS.items():
        assert info.name is method and method_info(method.value) is info
        assert info.default_scope in info.scopes
        assert info.needs_data or not (info.needs_gradients or info.needs_labels)
        assert not info.taylor or info.needs_gradients
    with pytest.raises(ValueError):
        method_info("nope")


@pytest.mark.parametrize("method", list(Method))
def test_every_factory_builds_an_estimator_that_covers_the_layout(method):
    info, model = method_info(method), small_model()
    names = select_parameters(model)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    estimator = info.estimator(FisherConfig(m=8, lam=1e-2), 4)
    assert estimator.block_size == (4 if info.uses_blocks else None)
    layout = BlockLayout.for_model(model, names, estimator.block_size)
    mask = torch.ones(layout.width, dtype=torch.float64)
    curvature = estimator.estimate(model, layout, mask, (x, y) if info.needs_data else None)
    covered = sorted((s.offset, s.offset + s.inv.nb * s.inv.c) for s in curvature.segments)
    assert covered[0][0] == 0 and covered[-1][1] == layout.width
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    if info.taylor:
        assert curvature.grad is not None


@pytest.mark.parametrize("method", list(Method))
def test_spec_and_pruner_refuse_exactly_what_the_table_forbids(method):
    info = method_info(method)
    for scope, update in itertools.product([None, *Scope], ["summed", "joint"]):
        allowed = (scope is None or scope in info.scopes) and (update == "summed" or info.supports_joint)
        body = {"method": method.value, "sparsity": 0.5, "scope": scope and scope.value, "fisher": {"update": update}}
        if allowed:
            PruneSpec(**body)
            assert make_pruner(method, scope=scope, joint=update == "joint").scope is (scope or info.default_scope)
        else:
            with pytest.raises(ValidationError):
                PruneSpec(**body)
            with pytest.raises(ValueError):
                make_pruner(method, scope=scope, joint=update == "joint")


def test_refusals_keep_their_messages():
    with pytest.raises(ValidationError, match="magnitude is per layer; use method global_magnitude"):
        PruneSpec(method="magnitude", sparsity=0.5, scope="global")
    with pytest.raises(ValidationError, match=r"kfac supports fisher\.update = 'summed' only"):
        PruneSpec(method="kfac", sparsity=0.5, fisher={"update": "joint"})


def test_fisher_examples_follow_the_table():
    for method, info in METHODS.items():
        spec = PruneSpec(method=method, sparsity=0.5, fisher={"samples": 10, "batch_size": 3})
        assert spec.fisher_examples == (30 if info.needs_data else 0)


# Weights (6, 4) and (2, 6), 4-byte items. Block 8, m = 6: blocks 3 × 8 and 2 × 8 (4 padded), width 40, c > m.
# Whole layers, m = 16: blocks 1 × 24 (c > m) and 1 × 12 (c ≤ m), width 36.
EXPECTED = {
    (8, 6): {
        Method.WOODFISHER: (6 * 40 * 4, 5 * (6 * 8 + 6 * 6) * 4),
        Method.DIAG_FISHER: (6 * 40 * 4, 40 * 4),
        Method.KFAC: (0, 2 * (6 * 6 + 4 * 4 + 2 * 2 + 6 * 6) * 4),
        Method.EXACT_OBS: (0, 3 * 40 * 40 * 4),
    },
    (None, 16): {
        Method.WOODFISHER: (16 * 36 * 4, (16 * 24 + 16 * 16 + 12 * 12) * 4),
        Method.DIAG_FISHER: (16 * 36 * 4, 36 * 4),
        Method.KFAC: (0, 2 * (6 * 6 + 4 * 4 + 2 * 2 + 6 * 6) * 4),
        Method.EXACT_OBS: (0, 3 * 36 * 36 * 4),
    },
}
# Layer-wise methods: no gradients; the input Hessians of the layers (4 × 4 and 6 × 6), whatever the blocks and m.
LAYERWISE = {m: (0, (4 * 4 + 6 * 6) * 4) for m in (Method.SPARSEGPT, Method.OBC, Method.WANDA)}
EXPECTED = {
    k: {
        **v,
        Method.WOODTAYLOR: v[Method.WOODFISHER],
        Method.MAGNITUDE: (0, 0),
        Method.GLOBAL_MAGNITUDE: (0, 0),
        **LAYERWISE,
    }
    for k, v in EXPECTED.items()
}


@pytest.mark.parametrize("block_size,m", list(EXPECTED))
@pytest.mark.parametrize("method", list(Method))
def test_memory_plan_is_the_declared_formula(method, block_size, m):
    model = small_model()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in select_parameters(model)}
    p = plan(method, shapes, block_size, m, 4, path="buffered")  # the declared (buffered) formula; streamed: #15
    assert (p.gradient_bytes, p.inverse_bytes) == EXPECTED[block_size, m][method]
    assert (p.gradient_bytes, p.inverse_bytes) == method_info(method).memory(BlockLayout(shapes, block_size), m, 4)
    assert p.working_bytes == max(
        0,
        method_info(method).peak(BlockLayout(shapes, block_size), Sizing(m, 4)) - sum(EXPECTED[block_size, m][method]),
    )
    # Over budget: only block methods shrink their blocks (when smaller blocks do lower the peak: a step's vectors
    # or a vmap chunk may dominate it), the others are refused.
    if p.total_bytes:
        small = plan(method, shapes, 1, m, 4, path="buffered").total_bytes
        if method_info(method).uses_blocks and small < p.total_bytes:
            shrunk = fit(method, shapes, block_size, m, 4, p.total_bytes - 1, True, path="buffered")
            assert shrunk.block_size < (block_size or 24)
        else:
            with pytest.raises(DoesNotFit):
                fit(method, shapes, block_size, m, 4, p.total_bytes - 1, True, path="buffered")
