"""Structured WoodFisher (OBS group saliency on the consumer's Fisher blocks) and global allocation across families,
against float64 oracles: the exact minimiser of the quadratic model with the removed groups held at zero, Fisher
blocks formed from per-example gradients taken one example at a time by autograd."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from core.engine.curvature.base import FisherConfig
from core.engine.curvature.fisher import WoodFisher
from core.engine.layout import BlockLayout
from core.engine.structured.allocation import allocate, global_total
from core.engine.structured.fisher import consumer_inverse, fisher_groups, held_bytes, prune_consumer, unit_positions
from core.engine.structured.groups import find_families
from core.engine.structured.prune import prune_structured, removal_curves
from core.io.zoo import build_model

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _unit_columns(rows, cols, units, u):
    per = cols // units
    return [r * cols + u * per + j for r in range(rows) for j in range(per)]


def _exact(f, w, removed_cols):
    """min ½·δᵀFδ subject to (w + δ)_S = 0, by a dense float64 solve: (the loss, w + δ)."""
    s = sorted(removed_cols)
    rest = [i for i in range(len(w)) if i not in set(s)]
    d = torch.zeros_like(w)
    d[s] = -w[s]
    if rest:
        d[rest] = -torch.linalg.solve(f[rest][:, rest], f[rest][:, s] @ d[s])
    return float(0.5 * d @ f @ d), w + d


def _brute_greedy(f, w, rows, cols, units, remove):
    """The greedy sequence chosen by exhaustive exact solves: (order, incremental losses, final weights)."""
    order, losses, done, prev, final = [], [], [], 0.0, w
    for _ in range(remove):
        cands = [u for u in range(units) if u not in order]
        costs = {u: _exact(f, w, done + _unit_columns(rows, cols, units, u))[0] for u in cands}
        best = min(cands, key=costs.get)
        order.append(best)
        done += _unit_columns(rows, cols, units, best)
        losses.append(costs[best] - prev)
        prev, final = costs[best], _exact(f, w, done)[1]
    return order, losses, final


def _blocks_problem(rows, cols, c, m=9, lam=0.3, seed=0):
    """Random weights and a block-diagonal F = λI + GᵀG/m in the layout's blocks of c: (w, F dense, F⁻¹ blocks)."""
    g = torch.Generator().manual_seed(seed)
    d = rows * cols
    layer = BlockLayout({"w": (rows, cols)}, c).layers[0]
    grads = torch.zeros(m, layer.width, dtype=F64)
    grads[:, :d] = torch.randn(m, d, generator=g, dtype=F64) * torch.linspace(0.2, 3, d, dtype=F64)
    gb = layer.blocks(grads).movedim(0, 1)
    fb = lam * torch.eye(layer.block, dtype=F64) + gb.mT @ gb / m
    w = torch.randn(d, generator=g, dtype=F64)
    return w, torch.block_diag(*fb)[:d, :d], torch.linalg.inv(fb), layer


# -- the engine: fisher_groups against the exact quadratic model -----------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "cols", "units", "c"),
    [
        (4, 6, 6, 6),  # whole rows: each row's Q is one entry of its own block
        (3, 8, 4, 5),  # blocks straddle rows and units, the last one padded
        (2, 12, 3, 24),  # one block for the whole layer (q = 4 columns per unit)
        (5, 4, 2, 3),  # a unit's two columns split across blocks
    ],
)
def test_fisher_group_saliency_greedy_order_and_weights_equal_brute_force(rows, cols, units, c):
    w, f, finv, layer = _blocks_problem(rows, cols, c)
    flat = torch.zeros(layer.width, dtype=F64)
    flat[: rows * cols] = w
    remove = units - 1
    new, removed, losses = fisher_groups(layer.blocks(flat), finv, unit_positions(rows, cols, units, c), remove)
    order, expected, final = _brute_greedy(f, w, rows, cols, units, remove)
    assert removed == order
    torch.testing.assert_close(torch.tensor(losses, dtype=F64), torch.tensor(expected, dtype=F64), rtol=1e-9, atol=0)
    torch.testing.assert_close(new.flatten()[: rows * cols], final, rtol=1e-9, atol=1e-12)
    assert float(new.flatten()[rows * cols :].abs().sum()) == 0.0  # the padding stays zero
    first = [_exact(f, w, _unit_columns(rows, cols, units, u))[0] for u in range(units)]
    assert losses[0] == pytest.approx(min(first), rel=1e-9)  # ρ_Q = ½ Σ_b w_Qᵀ((F_b⁻¹)_QQ)⁻¹w_Q on the first step


def test_huge_lambda_reduces_to_the_consumer_column_norms_with_no_update():
    rows, cols, units = 6, 10, 10
    w, _f, _finv, _layer = _blocks_problem(rows, cols, cols)
    lam = 1e9
    finv = torch.linalg.inv(torch.linalg.inv(_finv) + lam * torch.eye(cols, dtype=F64))  # (F + λI)⁻¹, λ → ∞
    new, removed, losses = fisher_groups(w.view(rows, cols), finv, unit_positions(rows, cols, units, cols), 7)
    norms = w.view(rows, cols).square().sum(0)
    assert removed == torch.argsort(norms)[:7].tolist()
    torch.testing.assert_close(torch.tensor(losses, dtype=F64) / lam, 0.5 * norms[removed], rtol=1e-6, atol=0)
    kept = sorted(set(range(units)) - set(removed))
    torch.testing.assert_close(new[:, kept], w.view(rows, cols)[:, kept], rtol=1e-6, atol=1e-8)


def test_held_bytes_bounds_the_candidates_and_blocks():
    rows, cols, units, c = 7, 12, 4, 5
    blk, loc, valid = unit_positions(rows, cols, units, c)
    nb = -(-rows * cols // c)
    assert held_bytes(rows, cols, units, c) >= 8 * (nb * c * c + 2 * blk.shape[1] * c * c + units * valid[0].numel())
    per = cols // units  # whole rows: in place, no downdate temporary; k = per places in each row's block
    assert held_bytes(rows, cols, units, cols) == 8 * (rows * cols * cols + units * rows * (2 * per * per + 3 * per))
    assert int(valid.sum()) == rows * cols  # every weight belongs to exactly one unit's place
    places = {
        int(b) * c + int(p)
        for u in range(units)
        for b, ps, vs in zip(blk[u], loc[u], valid[u])
        for p, v in zip(ps, vs)
        if v
    }
    assert places == set(range(rows * cols))


# -- the consumer's Fisher: the method's own estimate, against per-example autograd ------------------------------------


def _mlp_data(n=40, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = x[:, :classes].argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, classes)).double()
    return model, x, y


def _explicit_fisher(model, name, x, y, lam, c):
    """λI + (1/n)Σ gᵢgᵢᵀ of one weight over every example, each gradient by its own backward pass, in blocks of c."""
    param = model.get_parameter(name)
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(param.grad.detach().flatten().clone())
    g = torch.stack(rows)
    layer = BlockLayout({name: tuple(param.shape)}, c).layers[0]
    padded = torch.zeros(len(x), layer.width, dtype=F64)
    padded[:, : layer.numel] = g
    gb = layer.blocks(padded).movedim(0, 1)
    return lam * torch.eye(layer.block, dtype=F64) + gb.mT @ gb / len(x)


@pytest.mark.parametrize(("c", "path"), [(5, "streamed"), (5, "buffered"), (20, "buffered"), (None, "auto")])
def test_consumer_inverse_is_the_inverse_of_the_explicit_block_fisher(c, path):
    """c = 5 (one block per row of a 4 × 5 consumer) dense, on both paths; c = 20 and 'layer' with m = 16 < c are
    Woodbury blocks, formed explicitly."""
    model, x, _y = _mlp_data()
    m = len(x) if c == 5 else 16
    cfg = FisherConfig(m=m, lam=0.05, path=path, chunk=7)
    xs = x if m == len(x) else x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:m]]
    ys = xs[:, :3].argmax(1)
    finv, lam = consumer_inverse(model, "2.weight", WoodFisher(cfg, c), (xs, ys), F64)
    assert lam == 0.05
    expected = torch.linalg.inv(_explicit_fisher(model, "2.weight", xs, ys, 0.05, c or 20))
    torch.testing.assert_close(finv, expected, rtol=1e-8, atol=1e-8)


def test_prune_structured_fisher_equals_the_exact_greedy_on_the_explicit_fisher():
    """The whole family step: F from per-example gradients (relative λ: α × its mean diagonal), the exact greedy,
    then the physically shrunk consumer holds the exact weights of the units that stay."""
    model, x, y = _mlp_data()
    fam = find_families(model, "neurons")[1]  # 2 → 4 hidden → consumer 4 (3 × 4)
    assert (fam.consumer, fam.units) == ("4", 4)
    w = model.get_parameter("4.weight").detach().clone()
    raw = _explicit_fisher(model, "4.weight", x, y, 0.0, 4)
    lam = 0.1 * float(raw.diagonal(dim1=-2, dim2=-1).mean())
    f = torch.block_diag(*(raw + lam * torch.eye(4, dtype=F64)))
    order, losses, final = _brute_greedy(f, w.flatten(), 3, 4, 4, 2)
    cfg = FisherConfig(m=len(x), lam=0.1, lam_scale="relative")

    def blocks(model, name):
        return consumer_inverse(model, name, WoodFisher(cfg, 4), (x, y), F64)[0]

    [result] = prune_structured(model, [fam], 0.5, None, saliency="fisher", fisher=blocks)
    assert result.removed == order
    assert result.loss == pytest.approx(sum(losses), rel=1e-8)
    kept = sorted(set(range(4)) - set(order))
    shrunk = model.get_parameter("4.weight").detach()
    torch.testing.assert_close(shrunk, final.view(3, 4)[:, kept], rtol=1e-8, atol=1e-10)
    assert model.get_parameter("2.weight").shape == (2, 5)  # the producer lost the same rows


def test_prune_consumer_keeps_shape_and_dtype_of_a_conv_weight():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, 2, 2, generator=g)  # 4 input channels of 2 × 2 columns each
    finv = torch.eye(16, dtype=F64).expand(3, 16, 16).clone()
    new, removed, _ = prune_consumer(weight, 4, finv, 2)
    assert new.shape == weight.shape and new.dtype == weight.dtype
    norms = weight.double().square().sum((0, 2, 3))
    assert removed == torch.argsort(norms)[:2].tolist()
    assert float(new[:, removed].abs().sum()) == 0.0


# -- global allocation ------------------------------------------------------------------------------------------------


def test_allocate_takes_the_cheapest_removals_in_order_and_keeps_one_per_family():
    curves = [[0.1, 0.2, 5.0], [0.05, 0.06, 0.07, 0.08, 0.09], [9.0]]
    units = [4, 6, 2]
    assert global_total(units, 0.5) == 6
    assert allocate(curves, units, 0.5) == [1, 5, 0]  # 0.05 … 0.09, then 0.1
    assert allocate(curves, units, 0.99) == [3, 5, 1]  # everything but one unit each: 12 − 3
    # a later removal cheaper than an earlier one waits for it (running maximum): family 0's 0.01 comes after 0.3
    assert allocate([[0.3, 0.01], [0.2, 0.25]], [3, 3], 0.34) == [0, 2]
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
        counts = allocate(curves, units, frac)
        assert sum(counts) == global_total(units, frac)
        assert all(0 <= k <= n - 1 for k, n in zip(counts, units))


@pytest.mark.parametrize("saliency", ["fisher", "obs", "l2"])
def test_global_allocation_on_lenet_removes_the_global_total_and_keeps_a_unit_everywhere(saliency):
    model = build_model("lenet5", input_size=8).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 8, 8, generator=g, dtype=F64)
    y = torch.randint(0, 10, (48,), generator=g)
    families = find_families(model, "channels") + find_families(model, "neurons")
    cfg = FisherConfig(m=48, lam=0.1, lam_scale="relative")

    def blocks(model, name):
        cols = model.get_parameter(name).flatten(1).shape[1]
        return consumer_inverse(model, name, WoodFisher(cfg, cols), (x, y), F64)[0]

    curves = removal_curves(model, families, x, saliency=saliency, fisher=blocks)
    assert [len(c) for c in curves] == [f.units - 1 for f in families]
    units = [f.units for f in families]
    counts = allocate(curves, units, 0.6)
    assert sum(counts) == round(0.6 * sum(units)) and all(k < n for k, n in zip(counts, units))
    results = prune_structured(model, families, 0.6, x, saliency=saliency, fisher=blocks, counts=counts)
    assert [r.units - r.kept for r in results] == counts
    assert model(x).shape == (48, 10)  # the shrunk model still runs


# -- the run path (core.runs) and its refusals ---------------------------------------------------------------------


def _digits(n=240, d=20, classes=4, seed=0):
    from core.io.data import Dataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return Dataset(x, x[:, :classes].argmax(1).long())


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_woodfisher_neurons_run_writes_a_smaller_model_that_loads_as_is(tmp_path, allocation):
    from safetensors.torch import load_file

    from core.runs.run import execute
    from core.runs.spec import PruneSpec

    kwargs = {"in_features": 20, "hidden": [32, 16], "num_classes": 4}
    torch.manual_seed(0)
    model = build_model("mlp", **kwargs)
    spec = PruneSpec(
        method="woodfisher",
        sparsity=0.5,
        structure="neurons",
        structure_allocation=allocation,
        fisher={"samples": 64},
        device="cpu",
    )
    result = execute(spec, model, _digits(), tmp_path)
    report = json.loads(result.artifacts["report"].read_text())
    st = report["structure"]
    assert st["saliency"] == "fisher" and st["allocation"]["kind"] == allocation
    assert (st["groups_total"], st["groups_removed"]) == (48, 24)
    if allocation == "uniform":
        assert st["arch_kwargs"] == {"hidden": [16, 8]}
    else:
        assert st["allocation"]["counts"] == [32 - st["arch_kwargs"]["hidden"][0], 16 - st["arch_kwargs"]["hidden"][1]]
        assert "predicted increase of the training loss" in st["allocation"]["score"]
    assert all(layer["obs_loss"] is not None and layer["obs_loss"] >= 0 for layer in st["layers"])
    assert set(st["fisher_lambdas"]) == {"layers.3.weight", "layers.5.weight"}  # relative λ, per consumer estimate
    plan = report["memory_plan"]
    assert "one block per row" in plan["block_choice"] and "layers.3.weight: c = 32" in plan["block_choice"]
    assert report["memory"]["planned_bytes"] == plan["total_bytes"]
    rebuilt = build_model("mlp", **{**kwargs, **st["arch_kwargs"]})
    rebuilt.load_state_dict(load_file(result.artifacts["pruned"]), strict=True)


def test_structured_woodfisher_and_global_refusals():
    from core.errors import DoesNotFit, InvalidInput
    from core.runs.preflight import check_job
    from core.runs.spec import PruneSpec

    structured, plain = PruneSpec(sparsity=0.5, structure="neurons"), PruneSpec(sparsity=0.5)
    assert (structured.fisher.damping, structured.fisher.lambda_scale) == (1e-3, "relative")  # its measured default
    assert (plain.fisher.damping, plain.fisher.lambda_scale) == (0.1, "relative")
    with pytest.raises(ValueError, match="structure_allocation is for a structure"):
        PruneSpec(sparsity=0.5, structure_allocation="global")
    with pytest.raises(ValueError, match="lambda 'auto' is not supported with a structure"):
        PruneSpec(sparsity=0.5, structure="neurons", fisher={"lambda": "auto"})
    common = {"num_examples": 100, "input_shape": [64], "num_classes": 10, "has_val": False}
    kwargs = {"in_features": 64, "hidden": [32], "num_classes": 10}
    glob = PruneSpec(sparsity=0.5, structure="neurons", structure_allocation="global", method="obc")
    with pytest.raises(InvalidInput, match="one intermediate_size") as e:
        check_job(glob, arch=None, arch_kwargs=None, model_format="huggingface", **common)
    assert e.value.errors[0]["loc"] == ["spec", "structure_allocation"]
    assert check_job(glob, arch="mlp", arch_kwargs=kwargs, **common) is None  # zoo: allowed; obc has no Fisher plan
    wf = PruneSpec(sparsity=0.5, structure="neurons", fisher={"samples": 64})
    plan = check_job(wf, arch="mlp", arch_kwargs=kwargs, **common)
    assert plan is not None and "layers.3.weight: c = 32" in plan.block_choice  # the consumer 10 × 32, whole rows
    layer = wf.model_copy(update={"fisher": wf.fisher.model_copy(update={"block_size": "layer"})})
    whole = check_job(layer, arch="mlp", arch_kwargs=kwargs, **common)
    assert whole.total_bytes > 320 * 320 * 8  # one explicit 320 × 320 float64 block
    tight = layer.model_copy(update={"memory_budget_mb": whole.total_bytes / 2**20 / 2})
    with pytest.raises(DoesNotFit, match="structured prune needs"):
        check_job(tight, arch="mlp", arch_kwargs=kwargs, **common)
    shrink = tight.model_copy(update={"allow_block_shrink": True})
    assert check_job(shrink, arch="mlp", arch_kwargs=kwargs, **common).total_bytes <= whole.total_bytes / 2


def test_woodfisher_ffn_job_on_a_hugging_face_model_exports_one_width_and_refuses_global(tmp_path):
    """A tiny BERT: the Fisher of each layer's ``output.dense`` through the packed text model (its own estimator,
    distillation objective); every layer keeps the same FFN width, so the config's intermediate_size holds it."""
    from _hf_models import jsonl, sentences, write_model, zip_folder
    from core.errors import InvalidInput
    from core.runs.hf_job import load_hf_job
    from core.runs.run import execute
    from core.runs.spec import PruneSpec

    archive = zip_folder(write_model(tmp_path / "b", "bert"), tmp_path / "b.zip")
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl([{"text": t} for t in sentences(20)]))
    spec = PruneSpec(method="woodfisher", sparsity=0.5, structure="neurons", fisher={"samples": 8}, device="cpu")
    run_spec, model, ds = load_hf_job(spec, archive, data, "jsonl")
    result = execute(run_spec, model, ds, tmp_path / "out")
    st = result.report["structure"]
    assert st["saliency"] == "fisher" and st["hf_config"] == {"intermediate_size": 16}
    assert all(layer["kept"] == 16 and layer["obs_loss"] >= 0 for layer in st["layers"])
    glob = run_spec.model_copy(update={"structure_allocation": "global"})
    with pytest.raises(InvalidInput, match="one intermediate_size"):
        execute(glob, model, ds, tmp_path / "out2")
