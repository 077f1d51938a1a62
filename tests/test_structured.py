"""Structured pruning (core.engine.structured): OBS group saliency against a least-squares oracle, the families a model
has, and the physical shrink against the masked model it must equal."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from core.engine.structured.groups import find_families
from core.engine.structured.prune import prune_structured, units_to_remove
from core.engine.structured.saliency import column_groups, l2_groups, obs_groups
from core.engine.structured.shrink import unit_index
from core.io.zoo import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(rows=5, d=12, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    w = torch.randn(rows, d, generator=g, dtype=torch.float64)
    return x, w, 2 * x.T @ x / n


def _lstsq_loss(x, w, removed_cols):
    """Exact cost of removing columns ``removed_cols``: min over the kept columns of ||X(w − w')ᵀ||²/n, and w'."""
    keep = [j for j in range(x.shape[1]) if j not in set(removed_cols)]
    y = x @ w.T
    sol = torch.linalg.lstsq(x[:, keep], y).solution
    new = torch.zeros_like(w)
    new[:, keep] = sol.T
    return float(((y - x[:, keep] @ sol) ** 2).sum() / len(x)), new


@pytest.mark.parametrize("q", [1, 3])
def test_obs_group_saliency_is_the_least_squares_cost(q):
    x, w, h = _problem()
    groups = column_groups(12 // q, 12)
    _, removed, losses = obs_groups(w, h, groups, 1, damp=0)
    exact = [_lstsq_loss(x, w, groups[g].tolist())[0] for g in range(len(groups))]
    assert removed == [min(range(len(exact)), key=exact.__getitem__)]
    assert losses[0] == pytest.approx(exact[removed[0]], rel=1e-9)


@pytest.mark.parametrize("q", [1, 2])
def test_greedy_order_and_update_equal_brute_force(q):
    x, w, h = _problem(seed=1)
    groups = column_groups(12 // q, 12)
    steps = 4
    new, removed, losses = obs_groups(w, h, groups, steps, damp=0)
    chosen: list[int] = []
    before = 0.0
    for _ in range(steps):  # brute force: every candidate's exact cost given the groups already removed
        costs = {
            g: _lstsq_loss(x, w, [c for k in [*chosen, g] for c in groups[k].tolist()])[0]
            for g in range(len(groups))
            if g not in chosen
        }
        best = min(costs, key=costs.get)
        assert losses[len(chosen)] == pytest.approx(costs[best] - before, rel=1e-7, abs=1e-10)
        chosen.append(best)
        before = costs[best]
    assert removed == chosen
    _, oracle = _lstsq_loss(x, w, [c for k in chosen for c in groups[k].tolist()])
    torch.testing.assert_close(new, oracle, rtol=1e-7, atol=1e-9)


def test_l2_baseline_takes_the_smallest_norms():
    assert l2_groups(torch.tensor([3.0, 1.0, 2.0, 0.5]), 2) == [3, 1]


def test_units_to_remove_keeps_one():
    assert units_to_remove(10, 0.5) == 5
    assert units_to_remove(2, 0.99) == 1
    assert unit_index(torch.tensor([0, 2]), 3, 6).tolist() == [0, 1, 4, 5]


def _mask_equivalent(model, fam, removed):
    """The original model with the removed units' consumer columns zeroed: what the shrunk model must compute."""
    model = _copy(model)
    consumer = model.get_submodule(fam.consumer)
    idx = unit_index(torch.tensor(removed), fam.units, consumer.weight.shape[1])
    with torch.no_grad():
        consumer.weight.index_fill_(1, idx, 0.0)
    return model


def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize(
    ("arch", "kwargs", "kind", "shape", "count"),
    [
        ("mlp", {"in_features": 20, "hidden": [16, 12]}, "neurons", (8, 20), 2),
        ("resnet20", {"in_channels": 1, "width": 8}, "channels", (4, 1, 8, 8), 9),
        ("lenet5", {"input_size": 8}, "channels", (4, 1, 8, 8), 1),  # conv2 feeds the next Sequential: kept
        ("lenet5", {"input_size": 8}, "neurons", (4, 1, 8, 8), 2),
    ],
)
def test_shrunk_model_equals_the_masked_one(arch, kwargs, kind, shape, count):
    torch.manual_seed(0)
    model = build_model(arch, **kwargs).double().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)

    def inner(m):  # the residual stream's families: tests/test_structured_residual.py (a masked stream oracle)
        return [f for f in find_families(m, kind) if not f.name.startswith("stream.")]

    families = inner(model)
    assert len(families) == count
    x = torch.randn(*shape, dtype=torch.float64)
    reference = model
    shrunk = _copy(model)
    results = prune_structured(shrunk, inner(shrunk), 0.5, None, saliency="l2")
    for fam, res in zip(families, results, strict=True):
        reference = _mask_equivalent(reference, fam, res.removed)
        assert res.kept == fam.units - units_to_remove(fam.units, 0.5)
    torch.testing.assert_close(shrunk(x), reference(x))
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())


def test_resnet20_inner_default_is_todays_model_and_rebuilds_the_shrunk_one():
    torch.manual_seed(3)
    a = build_model("resnet20")
    torch.manual_seed(3)
    b = build_model("resnet20", inner=[16] * 3 + [32] * 3 + [64] * 3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb)
    model = build_model("resnet20", in_channels=1, width=8).eval()
    x = torch.randn(16, 1, 8, 8)
    prune_structured(model, find_families(model, "channels"), 0.5, x, saliency="obs")
    from core.runs.structured import arch_kwargs

    kwargs = arch_kwargs(model)
    assert kwargs["inner"] == [4] * 3 + [8] * 3 + [16] * 3
    assert kwargs["widths"] == [4, 8, 16]  # and the stage widths
    rebuilt = build_model("resnet20", in_channels=1, width=8, **kwargs).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_obs_beats_l2_on_the_layer_reconstruction():
    """On an MLP with correlated hidden units, OBS with the update keeps the outputs closer than the L2 baseline."""
    torch.manual_seed(0)
    model = build_model("mlp", in_features=10, hidden=[64], num_classes=6).double().eval()
    x = torch.randn(512, 10, dtype=torch.float64)
    dense = model(x)
    errors = {}
    for saliency in ("obs", "l2"):
        m = _copy(model)
        prune_structured(m, find_families(m, "neurons"), 0.5, x, saliency=saliency, damp=1e-6)
        errors[saliency] = float(((m(x) - dense) ** 2).mean().detach())
    assert errors["obs"] < 0.5 * errors["l2"]


def test_obs_bias_column_absorbs_the_removed_units_mean():
    """A unit with a constant activation (bias only) is removed at no cost: the consumer's bias takes it over."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[0].bias[1] = 2.0
    x = torch.randn(64, 3, dtype=torch.float64)
    dense = model(x)
    (res,) = prune_structured(model, find_families(model, "neurons"), 0.25, x, saliency="obs", damp=1e-9)
    assert res.removed == [1]
    torch.testing.assert_close(model(x), dense)


def test_bert_ffn_and_heads_shrink_equals_the_masked_model(tmp_path):
    from transformers import AutoModel

    from tests._hf_models import write_model

    hf = AutoModel.from_pretrained(write_model(tmp_path / "m", "bert")).double().eval()
    ids = torch.randint(0, 20, (3, 7))
    for kind, count in (("neurons", 2), ("heads", 2)):
        families = find_families(hf, kind)
        assert len(families) == count
        shrunk = _copy(hf)
        results = prune_structured(shrunk, find_families(shrunk, kind), 0.5, None, saliency="l2")
        reference = hf
        for fam, res in zip(families, results, strict=True):
            reference = _mask_equivalent(reference, fam, res.removed)
        torch.testing.assert_close(shrunk(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state)
        layer = shrunk.encoder.layer[0]
        if kind == "neurons":
            assert layer.intermediate.dense.out_features == 16
        else:
            assert layer.attention.self.query.out_features == 8


def test_families_of_unsupported_kinds_are_empty():
    assert find_families(build_model("mlp"), "heads") == []
    assert find_families(build_model("mlp"), "channels") == []
    with pytest.raises(ValueError, match="unknown structure"):
        find_families(build_model("mlp"), "rows")
    assert list(itertools.chain(find_families(build_model("resnet20"), "neurons"))) == []


# -- runs: a structured job end to end (core.runs.structured) ------------------------------------------------------


def _digits(n=240, d=20, classes=4, seed=0):
    from core.io.data import Dataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes].argmax(1)).long()
    return Dataset(x, y)


@pytest.mark.parametrize("method", ["obc", "magnitude"])
def test_structured_run_writes_a_smaller_model_that_loads_as_is(tmp_path, method):
    import json

    from safetensors.torch import load_file

    from core.runs.run import execute
    from core.runs.spec import PruneSpec

    kwargs = {"in_features": 20, "hidden": [32, 16], "num_classes": 4}
    torch.manual_seed(0)
    model = build_model("mlp", **kwargs)
    spec = PruneSpec(method=method, sparsity=0.5, structure="neurons", finetune={"epochs": 1}, device="cpu")
    result = execute(spec, model, _digits(), tmp_path)
    report = json.loads(result.artifacts["report"].read_text())
    st = report["structure"]
    assert st["arch_kwargs"] == {"hidden": [16, 8]}
    assert (st["groups_total"], st["groups_removed"]) == (48, 24)
    assert st["saliency"] == ("obs" if method == "obc" else "l2")
    assert report["parameters"]["total"] < report["parameters"]["dense"]
    assert report["macs"]["sparse"] < report["macs"]["dense"]
    rebuilt = build_model("mlp", **{**kwargs, **st["arch_kwargs"]})
    rebuilt.load_state_dict(load_file(result.artifacts["pruned"]), strict=True)
    assert "onnx" in result.artifacts and result.artifacts["onnx"].stat().st_size > 0
    size = report["size"]  # measured on disk: the smaller dense model, nothing to compress
    assert size["pruned_safetensors_bytes"] == result.artifacts["pruned"].stat().st_size
    assert size["pruned_to_dense"] < 0.6 and size["compressed_bytes"] is None
    speed = report["speed"]["runtimes"]  # dense (before the prune) and the smaller model, in both runtimes
    for rt in ("torch_cpu", "onnxruntime_cpu"):
        assert speed[rt]["verdict"] == "speedup"
        assert set(speed[rt]["speedup"]) == {"batch_1", "batch_32"}, speed[rt]
    assert not list(tmp_path.glob(".dense.*"))  # the dense scratch files are gone
    x = _digits(n=16, seed=1).x_train
    import onnxruntime as ort

    sess = ort.InferenceSession(str(result.artifacts["onnx"]))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), rebuilt.eval()(x).detach(), rtol=1e-4, atol=1e-5)


def test_structured_spec_and_model_checks():
    from core.errors import InvalidInput
    from core.runs.spec import PruneSpec
    from core.runs.structured import check_structure

    with pytest.raises(ValueError, match="woodfisher, magnitude, sparsegpt, obc"):
        PruneSpec(sparsity=0.5, structure="neurons", method="kfac")  # kfac has no structured form
    with pytest.raises(ValueError, match="one-shot"):
        PruneSpec(sparsity=0.5, structure="neurons", method="obc", mode="gradual", finetune={"epochs": 6})
    spec = PruneSpec(sparsity=0.5, structure="channels", method="obc")
    with pytest.raises(InvalidInput, match="supports: neurons") as e:
        check_structure(build_model("mlp"), spec)
    assert e.value.errors[0]["loc"] == ["spec", "structure"]
    assert len(check_structure(build_model("resnet20"), spec)) == 12  # 9 blocks' inner channels, 3 stage widths
    only = spec.model_copy(update={"layers": spec.layers.model_copy(update={"include": ["blocks.0.*", "blocks.8.*"]})})
    assert [f.name for f in check_structure(build_model("resnet20"), only)] == ["blocks.0.conv1", "blocks.8.conv1"]
    none = spec.model_copy(update={"layers": spec.layers.model_copy(update={"exclude": ["blocks.*", "conv1.*"]})})
    with pytest.raises(InvalidInput, match="select 0 of the model's 12 channels families"):
        check_structure(build_model("resnet20"), none)


def test_structured_hf_job_exports_a_config_that_from_pretrained_loads(tmp_path):
    from transformers import AutoModel

    from _hf_models import jsonl, sentences, write_model, zip_folder
    from core.errors import InvalidInput
    from core.runs.hf_job import load_hf_job
    from core.runs.run import execute
    from core.runs.spec import PruneSpec

    archive = zip_folder(write_model(tmp_path / "b", "bert"), tmp_path / "b.zip")
    data = tmp_path / "d.jsonl"
    data.write_bytes(jsonl([{"text": t} for t in sentences(20)]))
    spec = PruneSpec(method="obc", sparsity=0.5, structure="neurons", fisher={"samples": 8}, device="cpu")
    run_spec, model, ds = load_hf_job(spec, archive, data, "jsonl")
    result = execute(run_spec, model, ds, tmp_path / "out")
    assert result.report["structure"]["hf_config"] == {"intermediate_size": 16}
    import zipfile

    zipfile.ZipFile(result.artifacts["hf_model"]).extractall(tmp_path / "hf")
    loaded = AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert loaded.encoder.layer[1].intermediate.dense.weight.shape == (16, 16)
    ids = ds.x_train[:2, 0].long()
    with torch.no_grad():  # the exported model computes what the run's shrunk model computes
        ours = model.hf(input_ids=ids).last_hidden_state
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, ours.float(), rtol=1e-4, atol=1e-4)
    # the smaller adapter's ONNX graph, timed against the dense one's in ONNX Runtime as a zoo model's is
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.artifacts["onnx"]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.eval()(ds.x_train[:3]).numpy()
    got = session.run(None, {session.get_inputs()[0].name: ds.x_train[:3].numpy()})[0]
    assert abs(got - expected).max() < 1e-4
    assert result.report["speed"]["runtimes"]["onnxruntime_cpu"]["speedup"]
    heads = PruneSpec(method="obc", sparsity=0.5, structure="heads", device="cpu")
    with pytest.raises(InvalidInput, match="pruned_heads"):
        execute(heads, model, ds, tmp_path / "out2")


def test_preflight_refuses_a_structure_the_model_lacks_before_queueing():
    from core.errors import InvalidInput
    from core.runs.preflight import check_job
    from core.runs.spec import PruneSpec

    common = {"num_examples": 100, "input_shape": [64], "num_classes": 10, "has_val": False}
    kwargs = {"in_features": 64, "hidden": [32], "num_classes": 10}
    spec = PruneSpec(method="obc", sparsity=0.5, structure="neurons")
    assert check_job(spec, arch="mlp", arch_kwargs=kwargs, **common) is None  # no Fisher memory plan
    with pytest.raises(InvalidInput, match=r"no heads .* supports: neurons"):
        check_job(spec.model_copy(update={"structure": "heads"}), arch="mlp", arch_kwargs=kwargs, **common)
    heads = spec.model_copy(update={"structure": "heads"})
    with pytest.raises(InvalidInput, match="pruned_heads"):
        check_job(heads, arch=None, arch_kwargs={"model_type": "bert"}, model_format="huggingface", **common)


@pytest.mark.parametrize(
    ("arch", "kwargs", "kind", "shape"),
    [
        ("lenet5", {"input_size": 8}, "channels", (2, 1, 8, 8)),
        ("lenet5", {"input_size": 8}, "neurons", (2, 1, 8, 8)),
        ("resnet18", {"num_classes": 10, "small_input": True}, "channels", (2, 3, 16, 16)),
        ("bottleneck", {"num_classes": 10, "small_input": True}, "channels", (1, 3, 8, 8)),
    ],
)
def test_every_zoo_shrink_rebuilds_from_its_arch_kwargs(arch, kwargs, kind, shape):
    """Bottleneck: resnet50's blocks (two inner widths each) in a one-block-per-stage ResNet, to keep the test small."""
    from core.io.zoo.resnet import Bottleneck, ResNet
    from core.runs.structured import arch_kwargs

    def build(**kw):
        return ResNet(Bottleneck, [1, 1, 1, 1], **kw) if arch == "bottleneck" else build_model(arch, **kw)

    torch.manual_seed(0)
    model = build(**kwargs).eval()
    dense = sum(p.numel() for p in model.parameters())
    prune_structured(model, find_families(model, kind), 0.5, None, saliency="l2")
    new = arch_kwargs(model)
    if arch == "bottleneck":
        assert len(new["inner"]) == 8  # two inner widths per bottleneck
    rebuilt = build(**kwargs, **new).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    assert sum(p.numel() for p in rebuilt.parameters()) < dense


class _StopAfter:
    """Run hooks that cancel once ``n`` checkpoints were written (and record the events)."""

    def __init__(self, n=None):
        self.n, self.events = n, []

    def progress(self, fraction, message): ...

    def metric(self, point): ...

    def event(self, kind, data):
        self.events.append(kind)

    def cancelled(self):
        return self.n is not None and self.events.count("checkpoint") >= self.n


@pytest.mark.parametrize("stop_after", [1, 2])
def test_structured_run_resumes_to_the_uninterrupted_weights(tmp_path, stop_after):
    """Checkpoints after the prune (1) and after fine-tuning epoch 1 (2): a resumed attempt shrinks the fresh dense
    model as the checkpoint says and ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from core.errors import Canceled
    from core.runs.checkpoint import DirectoryCheckpointer
    from core.runs.run import execute
    from core.runs.spec import PruneSpec

    kwargs = {"in_features": 20, "hidden": [32, 16], "num_classes": 4}
    torch.manual_seed(0)
    dense = build_model("mlp", **kwargs).state_dict()

    def fresh():
        model = build_model("mlp", **kwargs)
        model.load_state_dict(dense)
        return model

    spec = PruneSpec(method="obc", sparsity=0.5, structure="neurons", finetune={"epochs": 2}, device="cpu")
    whole = execute(spec, fresh(), _digits(), tmp_path / "a", _StopAfter(), DirectoryCheckpointer(tmp_path / "ck_a"))
    ck = DirectoryCheckpointer(tmp_path / "ck_b")
    with pytest.raises(Canceled):
        execute(spec, fresh(), _digits(), tmp_path / "b", _StopAfter(stop_after), ck)
    hooks = _StopAfter()
    resumed = execute(spec, fresh(), _digits(), tmp_path / "b", hooks, ck)
    assert "resumed" in hooks.events and "pruned" not in hooks.events  # the prune was not done again
    a, b = load_file(whole.artifacts["pruned"]), load_file(resumed.artifacts["pruned"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [p["kind"] for p in resumed.report["curve"]] == [p["kind"] for p in whole.report["curve"]]
    assert resumed.report["structure"] == whole.report["structure"]
    assert resumed.report["size"]["dense_safetensors_bytes"] == whole.report["size"]["dense_safetensors_bytes"]
