"""Residual-stream channels (core.engine.structured.residual): a ResNet stage's width pruned as one coupled group.

Oracles: the shrunk model against the dense model with the removed channels masked (the stream's channels zeroed
where they are written, every removed inner channel's consumer columns zeroed: the option A index map is not used
by the oracle, so it is checked); the coupled OBS saliency and update against a float64 least-squares brute force
over several consumers; the rebuilt zoo model (arch_kwargs + strict load)."""

from __future__ import annotations

import copy
from ast import literal_eval

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from core.engine.structured.groups import find_families
from core.engine.structured.prune import prune_structured, units_to_remove
from core.engine.structured.saliency import column_groups, obs_groups, obs_groups_coupled
from core.engine.structured.shrink import unit_index
from core.io.zoo import build_model
from core.runs.structured import arch_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)


def _stream_writers(model, fam):
    """The modules whose outputs are the stream ``fam`` (after the ReLU that follows): the stem's BN (its ReLU commutes
    with a 0/1 mask) and every block whose sum writes the stream."""
    names = {s.name.rsplit(".", 2)[0] for s in fam.producer_slices if ".conv2." in s.name or ".conv3." in s.name}
    writers = [model.get_submodule(n) for n in sorted(names)]
    if any(s.name == "conv1.weight" for s in fam.slices):
        writers.append(model.bn1)
    return writers


def _masked(model, families, results):
    """The dense model computing what the shrunk one must: removed inner channels' consumer columns zeroed, the
    removed stream channels zeroed wherever the stream is written (so no reader and no shortcut sees them)."""
    model = copy.deepcopy(model)
    for fam, res in zip(families, results, strict=True):
        if fam.name.startswith("stream."):
            mask = torch.ones(fam.units, dtype=torch.float64)
            mask[res.removed] = 0.0
            for writer in _stream_writers(model, fam):
                writer.register_forward_hook(lambda _m, _a, out, mask=mask: out * mask[None, :, None, None])
        else:
            consumer = model.get_submodule(fam.consumer)
            idx = unit_index(torch.tensor(res.removed), fam.units, consumer.weight.shape[1])
            with torch.no_grad():
                consumer.weight.index_fill_(1, idx, 0.0)
    return model


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("arch", ["resnet20", "resnet32"])
def test_shrunk_resnet_equals_the_masked_model(arch, shortcut):
    torch.manual_seed(0)
    model = build_model(arch, in_channels=1, width=8, shortcut=shortcut).double().eval()
    _randomise_bn(model)
    families = find_families(model, "channels")
    n = len(model.blocks)
    assert [f.name for f in families[n:]] == ["stream.0", "stream.1", "stream.2"]
    assert [f.units for f in families[n:]] == [8, 16, 32]
    shrunk = copy.deepcopy(model)
    results = prune_structured(shrunk, find_families(shrunk, "channels"), 0.5, None, saliency="l2")
    for fam, res in zip(families, results, strict=True):
        assert res.kept == fam.units - units_to_remove(fam.units, 0.5)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), _masked(model, families, results)(x), rtol=1e-12, atol=1e-12)
    kwargs = arch_kwargs(shrunk)
    assert kwargs["widths"] == [4, 8, 16]
    assert ("shortcut_index" in kwargs) == (shortcut == "A")
    rebuilt = build_model(arch, in_channels=1, width=8, shortcut=shortcut, **kwargs).double().eval()
    rebuilt.load_state_dict(shrunk.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), shrunk(x), rtol=0, atol=0)


def test_option_a_index_maps_the_kept_channels_of_both_stages():
    """Stage 0 keeps channels {1, 3} of 4, stage 1 keeps {2, 3, 6} of 8 (zero-pad: stage-0 j → 2 + j): channel 1
    lands on 3, now position 1 of the kept; channel 3 lands on 5, removed."""
    model = build_model("resnet20", in_channels=1, width=4)
    families = {f.name: f for f in find_families(model, "channels")}
    from core.engine.structured.shrink import shrink

    shrink(model, families["stream.0"], torch.tensor([1, 3]))
    shrink(model, families["stream.1"], torch.tensor([2, 3, 6]))
    assert arch_kwargs(model)["shortcut_index"][0] == [1, -1]
    assert model.blocks[3].shortcut.source.tolist() == [-1, 0, -1]


def test_coupled_obs_equals_the_least_squares_brute_force():
    """Three consumers read the same 4 units (1, 2 and 3 columns each): each greedy choice is the unit whose removal
    costs least summed over the consumers' exact least-squares costs (each re-fitted), and the updates are those
    re-fits."""
    g = torch.Generator().manual_seed(0)
    units, rows, n = 4, 3, 300
    qs = [1, 2, 3]
    xs, ws, hs, groups = [], [], [], []
    for q in qs:
        d = units * q
        x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
        xs.append(x)
        ws.append(torch.randn(rows, d, generator=g, dtype=torch.float64))
        hs.append(2 * x.T @ x / n)
        groups.append(column_groups(units, d))

    def cost(k, removed_units):
        cols = [c for u in removed_units for c in groups[k][u].tolist()]
        keep = [j for j in range(xs[k].shape[1]) if j not in set(cols)]
        y = xs[k] @ ws[k].T
        sol = torch.linalg.lstsq(xs[k][:, keep], y).solution
        new = torch.zeros_like(ws[k])
        new[:, keep] = sol.T
        return float(((y - xs[k][:, keep] @ sol) ** 2).sum() / n), new

    steps = 3
    news, removed, losses = obs_groups_coupled(ws, hs, groups, steps, damp=0)
    chosen, before = [], 0.0
    for _ in range(steps):
        totals = {u: sum(cost(k, [*chosen, u])[0] for k in range(3)) for u in range(units) if u not in chosen}
        best = min(totals, key=totals.get)
        assert losses[len(chosen)] == pytest.approx(totals[best] - before, rel=1e-7, abs=1e-10)
        chosen.append(best)
        before = totals[best]
    assert removed == chosen
    for k in range(3):
        torch.testing.assert_close(news[k], cost(k, chosen)[1], rtol=1e-7, atol=1e-9)
    # one consumer: the single-consumer OBS
    one, removed_one, losses_one = obs_groups_coupled(ws[1:2], hs[1:2], groups[1:2], 2, damp=0.01)
    ref, removed_ref, losses_ref = obs_groups(ws[1], hs[1], groups[1], 2, damp=0.01)
    assert removed_one == removed_ref
    torch.testing.assert_close(one[0], ref)
    assert losses_one == pytest.approx(losses_ref)


def test_obs_on_the_stream_beats_l2_and_updates_every_consumer():
    """ResNet-20 (option B), stream families only, OBS with the joint update: the logits stay closer to the dense
    model's than with the L2 baseline; the classifier's bias moved (it is a consumer's extra column)."""
    torch.manual_seed(0)
    dense = build_model("resnet20", in_channels=1, width=8, shortcut="B").double().eval()
    _randomise_bn(dense)
    x = torch.randn(64, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        target = dense(x)
    errors = {}
    for saliency in ("obs", "l2"):
        m = copy.deepcopy(dense)
        streams = [f for f in find_families(m, "channels") if f.name.startswith("stream.")]
        results = prune_structured(m, streams, 0.25, x, saliency=saliency, damp=1e-4)
        if saliency == "obs":
            assert all(r.loss is not None and r.loss >= 0 for r in results)
            assert not torch.equal(m.fc.bias, dense.fc.bias)
        with torch.no_grad():
            errors[saliency] = float(((m(x) - target) ** 2).mean())
    assert errors["obs"] < errors["l2"]


@pytest.mark.parametrize(
    ("arch", "kwargs", "shape"),
    [
        ("resnet18", {"num_classes": 10, "small_input": True}, (2, 3, 16, 16)),
        ("bottleneck", {"num_classes": 10, "small_input": True}, (1, 3, 8, 8)),
    ],
)
def test_torchvision_resnet_stream_widths_rebuild_and_equal_the_masked_model(arch, kwargs, shape):
    from core.io.zoo.resnet import Bottleneck, ResNet

    def build(**kw):
        return ResNet(Bottleneck, [1, 1, 1, 1], **kw) if arch == "bottleneck" else build_model(arch, **kw)

    torch.manual_seed(0)
    model = build(**kwargs).double().eval()
    _randomise_bn(model)
    families = find_families(model, "channels")
    streams = [f for f in families if f.name.startswith("stream.")]
    assert len(streams) == (5 if arch == "bottleneck" else 4)  # a bottleneck's stem is a width of its own
    shrunk = copy.deepcopy(model)
    results = prune_structured(shrunk, find_families(shrunk, "channels"), 0.5, None, saliency="l2")
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), _masked(model, families, results)(x), rtol=1e-10, atol=1e-10)
    new = arch_kwargs(shrunk)
    expected = [32, 128, 256, 512, 1024] if arch == "bottleneck" else [32, 32, 64, 128, 256]
    assert new["widths"] == expected
    rebuilt = build(**kwargs, **new).double().eval()
    rebuilt.load_state_dict(shrunk.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), shrunk(x), rtol=0, atol=0)


def _digits_image(n=160, seed=0):
    from core.io.data import Dataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :2, :2].flatten(1).argmax(1)).long()
    return Dataset(x, y)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_structured_run_on_resnet20_prunes_stage_widths_and_rebuilds(tmp_path, shortcut):
    """core.runs end to end: 50 % of every family (9 blocks' inner channels and 3 stage widths) removed by OBS, one
    fine-tuning epoch; the report's arch_kwargs build the smaller model, which loads pruned.safetensors strictly and
    computes what the ONNX export computes."""
    from core.runs.run import execute
    from core.runs.spec import PruneSpec

    base = {"in_channels": 1, "num_classes": 4, "width": 8, "shortcut": shortcut}
    torch.manual_seed(0)
    model = build_model("resnet20", **base)
    spec = PruneSpec(
        method="obc", sparsity=0.5, structure="channels", fisher={"samples": 64}, finetune={"epochs": 1}, device="cpu"
    )
    result = execute(spec, model, _digits_image(), tmp_path)
    st = result.report["structure"]
    assert st["arch_kwargs"]["widths"] == [4, 8, 16]
    assert st["arch_kwargs"]["inner"] == [4] * 3 + [8] * 3 + [16] * 3
    total = 3 * (8 + 16 + 32) + (8 + 16 + 32)  # 9 blocks' inner channels, then the 3 stage widths
    assert (st["groups_total"], st["groups_removed"]) == (total, total // 2)
    assert [r["name"] for r in st["layers"][-3:]] == ["stream.0", "stream.1", "stream.2"]
    assert all(r["obs_loss"] is not None for r in st["layers"])
    rebuilt = build_model("resnet20", **base, **st["arch_kwargs"]).eval()
    rebuilt.load_state_dict(load_file(result.artifacts["pruned"]), strict=True)
    assert sum(p.numel() for p in rebuilt.parameters()) == result.report["parameters"]["total"]
    assert result.report["parameters"]["total"] < 0.3 * result.report["parameters"]["dense"]
    import onnxruntime as ort

    x = _digits_image(n=8, seed=1).x_train
    sess = ort.InferenceSession(str(result.artifacts["onnx"]))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), rebuilt(x), rtol=1e-4, atol=1e-5)


def test_constructor_checks_the_new_arguments():
    from core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="widths must list 3"):
        build_model("resnet20", widths=[4, 8])
    with pytest.raises(InvalidInput, match="for shortcut 'A' only"):
        build_model("resnet20", shortcut="B", shortcut_index=[[0], [0]])
    with pytest.raises(InvalidInput, match="maps two channels onto one"):
        build_model("resnet20", widths=[2, 4, 8], shortcut_index=[[1, 1], [0, 1, 2, 3]])
    with pytest.raises(InvalidInput, match=r"into \[0, 4\)"):
        build_model("resnet20", widths=[2, 4, 8], shortcut_index=[[0, 4], [0, 1, 2, 3]])
    model = build_model("resnet20")  # the dense default: the paper's zero-padding, no buffer in the state dict
    assert arch_kwargs(model)["shortcut_index"] == [[8 + j for j in range(16)], [16 + j for j in range(32)]]
    assert not any("source" in k for k in model.state_dict())


def test_resumed_resnet_run_rebuilds_the_same_shortcut_maps(tmp_path):
    """A run canceled after the prune's checkpoint and resumed (the fresh dense model shrunk family by family as the
    checkpoint says, the option A index maps renumbered again: they are not in the state dict) ends with the
    uninterrupted run's weights and arch_kwargs."""
    from core.errors import Canceled
    from core.runs.checkpoint import DirectoryCheckpointer
    from core.runs.run import execute
    from core.runs.spec import PruneSpec
    from test_structured import _StopAfter

    base = {"in_channels": 1, "num_classes": 4, "width": 4}
    torch.manual_seed(0)
    dense = build_model("resnet20", **base).state_dict()

    def fresh():
        model = build_model("resnet20", **base)
        model.load_state_dict(dense)
        return model

    spec = PruneSpec(
        method="obc", sparsity=0.5, structure="channels", fisher={"samples": 32}, finetune={"epochs": 1}, device="cpu"
    )
    whole_ck = DirectoryCheckpointer(tmp_path / "a_ck")
    whole = execute(spec, fresh(), _digits_image(), tmp_path / "a", _StopAfter(), whole_ck)
    ck = DirectoryCheckpointer(tmp_path / "b_ck")
    with pytest.raises(Canceled):
        execute(spec, fresh(), _digits_image(), tmp_path / "b", _StopAfter(1), ck)
    hooks = _StopAfter()
    resumed = execute(spec, fresh(), _digits_image(), tmp_path / "b", hooks, ck)
    assert "resumed" in hooks.events and "pruned" not in hooks.events
    assert resumed.report["structure"]["arch_kwargs"] == whole.report["structure"]["arch_kwargs"]
    a, b = load_file(whole.artifacts["pruned"]), load_file(resumed.artifacts["pruned"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_woodfisher_refuses_stage_widths_and_names_them():
    """Fisher group saliency scores a unit on its one consumer's blocks; a stage width has several readers, so a
    woodfisher channels job on a ResNet is a 422 naming the stream families and what to exclude; with those
    excluded, the blocks' inner channels remain and are accepted."""
    from core.errors import InvalidInput
    from core.runs.spec import PruneSpec
    from core.runs.structured import check_structure

    model = build_model("resnet20", in_channels=1, num_classes=10)
    spec = PruneSpec(method="woodfisher", structure="channels", sparsity=0.5)
    with pytest.raises(InvalidInput, match=r"stream\.0, stream\.1, stream\.2") as e:
        check_structure(model, spec)
    excluded = e.value.detail.split("layers.exclude ")[1]
    spec = PruneSpec(
        method="woodfisher", structure="channels", sparsity=0.5, layers={"exclude": literal_eval(excluded)}
    )
    families = check_structure(model, spec)
    assert len(families) == 9 and not any(f.more_consumers for f in families)
    assert all(f.name.startswith("blocks.") for f in families)


def test_global_allocation_ranks_stage_widths_by_their_summed_consumers(tmp_path):
    """structure_allocation 'global' over the 9 blocks' inner channels and the 3 stage widths: each stage width's
    removals are scored by OBS summed over all its readers over their summed output energy; the counts differ by
    family, remove half of all units in total, keep one unit at least everywhere, and the model rebuilds strictly."""
    from core.engine.structured.prune import removal_curves
    from core.runs.run import execute
    from core.runs.spec import PruneSpec

    base = {"in_channels": 1, "num_classes": 4, "width": 8, "shortcut": "A"}
    torch.manual_seed(0)
    model = build_model("resnet20", **base)
    families = find_families(model, "channels")
    x = _digits_image().x_train[:64]
    curves = removal_curves(model, families, x, saliency="obs")
    stream = [c for f, c in zip(families, curves, strict=True) if f.more_consumers]
    assert len(stream) == 3 and all(len(c) == f.units - 1 for f, c in zip(families, curves, strict=True))
    assert all(v >= 0 for c in stream for v in c) and any(v > 0 for c in stream for v in c)
    # the first removal of stream.0, recomputed unit by unit: each reader's OBS cost of that unit alone, summed
    from core.engine.structured.prune import _hessians

    fam = next(f for f in families if f.more_consumers)
    readers = [model.get_submodule(c) for c in fam.consumers]
    model.eval()  # as removal_curves scores it (BatchNorm on its running statistics)
    hs = _hessians(model, readers, x, 16)
    ws = [r.weight.detach().flatten(1).double() for r in readers]
    ws = [
        torch.cat([w, r.bias.detach().double()[:, None]], 1) if isinstance(r, nn.Linear) else w
        for w, r in zip(ws, readers, strict=True)
    ]
    energy = sum(0.5 * float(((w @ h) * w).sum()) for w, h in zip(ws, hs, strict=True))
    per_unit = [
        sum(
            obs_groups(w, h, column_groups(fam.units, w.shape[1], skip_last=w.shape[1] % fam.units)[u : u + 1], 1)[2][0]
            for w, h in zip(ws, hs, strict=True)
        )
        for u in range(fam.units)
    ]
    assert stream[0][0] == pytest.approx(min(per_unit) / energy, rel=1e-9)
    spec = PruneSpec(
        method="obc",
        sparsity=0.5,
        structure="channels",
        structure_allocation="global",
        fisher={"samples": 64},
        device="cpu",
    )
    result = execute(spec, model, _digits_image(), tmp_path)
    st = result.report["structure"]
    counts = st["allocation"]["counts"]
    total = 3 * (8 + 16 + 32) + (8 + 16 + 32)
    assert sum(counts) == total // 2 and len(set(counts)) > 3
    assert all(r["kept"] >= 1 for r in st["layers"])
    rebuilt = build_model("resnet20", **base, **st["arch_kwargs"]).eval()
    rebuilt.load_state_dict(load_file(result.artifacts["pruned"]), strict=True)
