"""Issue #14, the ONNX part: transformer exports import. MiniLM (pre-trained), a tiny GPT-2 and a tiny BERT
classifier, exported by both of torch's exporters, run like PyTorch and onnxruntime on padded batches; their
MatMul/Gemm weights are the prunable Linear parameters; per-example gradients go through them (the Fisher path);
each new op matches onnxruntime on single-op graphs (broadcasting, attribute and opset variants) and refuses
what the spec forbids with ``InvalidInput``; an imported transformer exports to ONNX again."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn
from torch.func import functional_call, grad, vmap

from _hf_onnx import MODELS, IdsAndMask, TokenClassifier, batch, export, minilm
from _model_bombs import i64
from _onnx_ops import BAD_CASES, B, bad_model, f32, graph, node, rng
from core.errors import InvalidInput, LimitExceeded
from core.io.limits import LoadLimits
from core.io.onnx import onnx_to_torch
from core.io.onnx.export import export_onnx

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

EXPORTERS = {"dynamo": True, "torchscript": False}
SHAPES = [(2, 8), (3, 5), (1, 11), (4, 1)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(name, exporter) -> (the PyTorch module, the ONNX file): each exported once, on first use."""
    d, cache, models = tmp_path_factory.mktemp("hf"), {}, {}

    def get(name: str, exporter: str):
        if (name, exporter) not in cache:
            if name not in models:
                models[name] = IdsAndMask(MODELS[name]()).eval()
            path = d / f"{name}-{exporter}.onnx"
            cache[name, exporter] = models[name], export(models[name], batch(2, 8), path, dynamo=EXPORTERS[exporter])
        return cache[name, exporter]

    return get


def _linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight a Linear-like layer of ``model`` holds, as (out, in): GPT-2's Conv1D stores (in, out)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = m.weight.detach()
        elif type(m).__name__ == "Conv1D":
            out[name] = m.weight.detach().t()
    return out


@pytest.mark.parametrize("exporter", list(EXPORTERS))
@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_matches_pytorch_and_onnxruntime(name, exporter, exported):
    model, path = exported(name, exporter)
    converted = onnx_to_torch(path).eval()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = [i.name for i in session.get_inputs()]
    for seed, (b, s) in enumerate(SHAPES):
        ids, mask = batch(b, s, seed)
        with torch.no_grad():
            got, want = converted(ids, mask), model(ids, mask)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        (ref,) = session.run(None, dict(zip(feeds, [ids.numpy(), mask.numpy()])))
        np.testing.assert_allclose(got.numpy(), ref, atol=2e-5, rtol=1e-4)
    # padding matters: the same tokens with more of them masked give another output (the mask is not ignored)
    ids, mask = batch(4, 8)
    with torch.no_grad():
        padded, full = converted(ids, mask), converted(ids, torch.ones_like(mask))
    assert (padded - full)[1:].abs().amax() > 1e-3 * full.abs().amax()  # ten times rtol above
    torch.testing.assert_close(padded[0], full[0], atol=2e-5, rtol=1e-4)  # row 0 has no padding

    # every weight of the model's Linear layers that the graph uses is a Linear parameter of the import, same values
    ours = [m.weight for m in converted.layers.values() if isinstance(m, nn.Linear)]
    theirs = {n: w for n, w in _linear_weights(model).items() if "pooler" not in n or name == "bert"}
    assert theirs and len(ours) >= len(theirs)
    for n, w in theirs.items():
        assert any(o.shape == w.shape and torch.equal(o, w) for o in ours), f"{n} is not a Linear of the import"
    params = {n for n, p in converted.named_parameters()}
    assert all(f"layers.{k}.weight" in params for k, m in converted.layers.items() if isinstance(m, nn.Linear))


def test_gradients_per_example_through_an_imported_classifier(exported):
    """``vmap(grad)`` over examples with integer token ids, as the Fisher samples are taken, equals the gradient
    of each example alone, and the gradient of the original model."""
    model, path = exported("bert", "dynamo")
    converted = onnx_to_torch(path).eval()
    params = {n: p.detach() for n, p in converted.named_parameters()}
    buffers = dict(converted.named_buffers())

    def loss(p, ids, mask, y):
        return F.cross_entropy(functional_call(converted, (p, buffers), (ids, mask)), y)

    ids, mask = batch(3, 6)
    ids, mask, y = ids.unsqueeze(1), mask.unsqueeze(1), torch.tensor([[0], [2], [1]])
    g = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, ids, mask, y)
    hf = model.model
    classifier = next(n for n, m in converted.layers.items() if m.weight.shape == hf.classifier.weight.shape)
    for i in range(3):
        ref = grad(loss)(params, ids[i], mask[i], y[i])
        for n in params:
            torch.testing.assert_close(g[n][i], ref[n], rtol=1e-4, atol=1e-6)
        hf.zero_grad()
        F.cross_entropy(model(ids[i], mask[i]), y[i]).backward()
        torch.testing.assert_close(g[f"layers.{classifier}.weight"][i], hf.classifier.weight.grad, rtol=1e-4,
                                   atol=1e-6)  # fmt: skip


def test_imported_transformer_exports_again(tmp_path):
    """The pruned-model export (one input, as a run has it): an imported MiniLM classifier goes out through
    ``export_onnx`` and back in with the same outputs."""
    net = TokenClassifier(minilm(layers=1)).eval()
    ids, mask = batch(3, 7, vocab=1000)
    x = (ids * mask).float()
    path = export(net, (x,), tmp_path / "in.onnx", dynamo=True)
    converted = onnx_to_torch(path).eval()
    out = export_onnx(converted, x[:1], tmp_path / "out.onnx")
    again = onnx_to_torch(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), net(x), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(again(x), converted(x), atol=2e-5, rtol=1e-4)
    assert list(again.state_dict()) == list(converted.state_dict())


# ----------------------------------------------------------------- single-op graphs against onnxruntime

OP_CASES: dict[str, tuple[list, dict, dict, int]] = {  # name -> (nodes, feeds, initializers, opset)
    "erf": ([node("Erf", ["x"])], {"x": f32(2, 3)}, {}, 13),
    "gelu_exact": ([node("Gelu", ["x"])], {"x": f32(2, 3, 4)}, {}, 20),
    "gelu_tanh": ([node("Gelu", ["x"], approximate="tanh")], {"x": f32(5)}, {}, 20),
    "pow_broadcast": ([node("Pow", ["x", "e"])], {"x": np.abs(f32(2, 3)) + 0.1, "e": f32(3)}, {}, 15),
    "pow_int_exponent": ([node("Pow", ["x", "e"])], {"x": f32(4, 1)}, {"e": B(3, np.int64)}, 15),
    "isnan": ([node("IsNaN", ["x"])], {"x": B([1.0, np.nan, -np.inf, 0.0], np.float32)}, {}, 13),
    "layernorm_last": ([node("LayerNormalization", ["x", "s", "b"], epsilon=1e-3)], {"x": f32(2, 3, 8)},
                       {"s": f32(8), "b": f32(8)}, 17),
    "layernorm_axis1_no_bias": ([node("LayerNormalization", ["x", "s"], axis=1)], {"x": f32(2, 3, 4)},
                                {"s": f32(3, 4)}, 17),
    "layernorm_negative_axis_broadcast_scale": ([node("LayerNormalization", ["x", "s", "b"], axis=-2)],
                                                {"x": f32(2, 3, 4)}, {"s": f32(1, 4), "b": f32(3, 1)}, 17),
    "not": ([node("Not", ["c"])], {"c": rng.random((2, 3)) > 0.5}, {}, 13),
    "and_broadcast": ([node("And", ["a", "c"])], {"a": rng.random((2, 1, 4)) > 0.5, "c": rng.random((3, 1)) > 0.5},
                      {}, 13),
    "or_broadcast": ([node("Or", ["a", "c"])], {"a": rng.random((4,)) > 0.5, "c": rng.random((3, 4)) > 0.5}, {}, 13),
    "equal_int": ([node("Equal", ["a", "c"])], {"a": B([[1, 2, 3]], np.int64), "c": B([[1], [3]], np.int64)}, {}, 13),
    "equal_float": ([node("Equal", ["a", "c"])], {"a": B([0.5, 1.0], np.float32), "c": B([0.5], np.float32)}, {}, 13),
    "greater": ([node("Greater", ["a", "c"])], {"a": f32(2, 3), "c": f32(3)}, {}, 13),
    "greater_or_equal": ([node("GreaterOrEqual", ["a", "c"])], {"a": B([1, 2, 3], np.int64)},
                         {"c": B(2, np.int64)}, 16),
    "less": ([node("Less", ["a", "c"])], {"a": f32(3, 1), "c": f32(1, 4)}, {}, 13),
    "less_or_equal": ([node("LessOrEqual", ["a", "c"])], {"a": B([[1], [2]], np.int64), "c": B([2, 1, 3], np.int64)},
                      {}, 16),
    "where_broadcast": ([node("Where", ["c", "a", "b"])], {"c": rng.random((3, 1)) > 0.5, "a": f32(1, 4),
                                                             "b": f32(4)}, {}, 16),
    "where_int": ([node("Where", ["c", "a", "b"])], {"c": B([True, False]), "a": B([1, 2], np.int64)},
                  {"b": B(-1, np.int64)}, 16),
    "max_three_broadcast": ([node("Max", ["a", "b", "c"])], {"a": f32(2, 3), "b": f32(3), "c": f32(2, 1)}, {}, 13),
    "max_one": ([node("Max", ["a"])], {"a": f32(2, 3)}, {}, 13),
    "min_int": ([node("Min", ["a", "b"])], {"a": B([[5, -1, 3]], np.int64), "b": B([[2], [0]], np.int64)}, {}, 13),
    "range_int": ([node("Range", ["s", "l", "d"])], {"s": B(2, np.int64), "l": B(11, np.int64),
                                                      "d": B(3, np.int64)}, {}, 11),
    "range_float_negative_delta": ([node("Range", ["s", "l", "d"])], {"s": B(1.5, np.float32),
                                   "l": B(-2.0, np.float32), "d": B(-0.75, np.float32)}, {}, 11),
    "range_empty": ([node("Range", ["s", "l", "d"])], {"s": B(5, np.int64), "l": B(1, np.int64),
                                                        "d": B(1, np.int64)}, {}, 11),
    "gather_elements_axis0": ([node("GatherElements", ["x", "i"])], {"x": f32(3, 4),
                              "i": B([[0, 2, 1, -1], [-3, 0, 0, 2]], np.int64)}, {}, 13),
    "gather_elements_last_axis": ([node("GatherElements", ["x", "i"], axis=-1)], {"x": f32(2, 3, 5),
                                  "i": rng.integers(-5, 5, (2, 2, 3))}, {}, 13),
    "gather_nd_full": ([node("GatherND", ["x", "i"])], {"x": f32(3, 4), "i": B([[0, 1], [2, -1], [1, 3]], np.int64)},
                       {}, 13),
    "gather_nd_slices": ([node("GatherND", ["x", "i"])], {"x": f32(3, 4, 2), "i": B([[[1]], [[2]]], np.int64)},
                         {}, 13),
    "gather_nd_batch_dims": ([node("GatherND", ["x", "i"], batch_dims=1)], {"x": f32(2, 3, 4),
                             "i": B([[[0, 1], [2, 3]], [[1, 0], [0, -1]]], np.int64)}, {}, 13),
    "split_equal": ([node("Split", ["x"], 3, axis=1)], {"x": f32(2, 6)}, {}, 13),
    "split_sizes_input": ([node("Split", ["x", "s"], 2, axis=-1)], {"x": f32(2, 3, 5)}, {"s": i64(2, 3)}, 13),
    "split_num_outputs_uneven": ([node("Split", ["x"], 3, num_outputs=3)], {"x": f32(7, 2)}, {}, 18),
    "split_attribute_opset11": ([node("Split", ["x"], 2, axis=0, split=[1, 3])], {"x": f32(4, 2)}, {}, 11),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_matches_onnxruntime(case):
    nodes, feeds, inits, opset = OP_CASES[case]
    model = graph(nodes, feeds, inits, opset)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    converted = onnx_to_torch(model)
    with torch.no_grad():
        got = converted(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()])
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == torch.from_numpy(np.asarray(w)).dtype and tuple(g.shape) == w.shape, (g.dtype, w.dtype)
        np.testing.assert_allclose(g.numpy(), w, atol=1e-6, rtol=1e-5)


def test_float64_layer_norm_against_the_formula():
    """LayerNormalization in float64 against (x - mean) / sqrt(var + eps) · scale + bias, written out."""
    x = torch.from_numpy(rng.standard_normal((3, 4, 5)))
    s, b = torch.from_numpy(rng.standard_normal((4, 5))), torch.from_numpy(rng.standard_normal(5))
    model = graph([node("LayerNormalization", ["x", "s", "b"], axis=1, epsilon=0.1)], {"x": x.numpy()},
                   {"s": s.numpy(), "b": b.numpy()}, 17)  # fmt: skip
    flat = x.reshape(3, -1)
    mean, var = flat.mean(1, keepdim=True), ((flat - flat.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True)
    eps = float(np.float32(0.1))  # ONNX float attributes are float32
    want = ((flat - mean) / torch.sqrt(var + eps)).reshape(3, 4, 5) * s + b
    torch.testing.assert_close(onnx_to_torch(model)(x), want, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------- bad inputs: InvalidInput, never a crash


def test_every_new_op_has_a_bad_input_case():
    from core.io.onnx.transformer_ops import OPS

    ops = {n.op_type for nodes, _, _ in BAD_CASES.values() for n in nodes}
    assert ops == set(OPS)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_op_is_invalid_input(case):
    with pytest.raises(InvalidInput, match=BAD_CASES[case][2]):
        onnx_to_torch(bad_model(case))


@pytest.mark.parametrize(
    "nodes, feeds, message",
    [
        ([node("GatherElements", ["x", "i"])], {"x": f32(2, 3), "i": B([[0, 5]], np.int64)}, "GatherElements node"),
        ([node("Split", ["x", "s"], 2)], {"x": f32(5), "s": B([2, 2], np.int64)}, "do not split an axis of size 5"),
        ([node("And", ["a", "b"])], {"a": B([True, False]), "b": B([True, False, True])}, "And node"),
    ],
)
def test_data_a_graph_cannot_run_on_is_invalid_input(nodes, feeds, message):
    """What only the data shows (an index out of range, sizes that do not add up, shapes that do not broadcast)
    is ``InvalidInput`` naming the node when the model runs, not a crash of the job."""
    converted = onnx_to_torch(graph(nodes, {k: v for k, v in feeds.items() if k != "s"},
                                     {k: v for k, v in feeds.items() if k == "s"}))  # fmt: skip
    with pytest.raises(InvalidInput, match=message):
        converted(*[torch.from_numpy(v) for k, v in feeds.items() if k != "s"])


def test_range_from_the_input_is_bounded_when_it_runs():
    """A Range whose length comes from the data is checked against the limit before it is built."""
    nodes = [helper.make_node("Cast", ["x"], ["n"], to=TensorProto.INT64),
             helper.make_node("Range", ["zero", "n", "one"], ["y"], name="r")]  # fmt: skip
    model = graph(nodes, {"x": B(3.0, np.float32)}, {"zero": B(0, np.int64), "one": B(1, np.int64)}, 13)
    converted = onnx_to_torch(model, LoadLimits(max_constant_elements=1000))
    assert converted(torch.tensor(3.0)).tolist() == [0, 1, 2]
    with pytest.raises(LimitExceeded, match=r"Range node 'r' would build a \[1000000000\] tensor"):
        converted(torch.tensor(1e9))


def test_a_two_input_graph_fed_one_tensor_is_invalid_input():
    """A job feeds one tensor of features; a graph of (input_ids, attention_mask) says what it takes."""
    converted = onnx_to_torch(graph([node("Add", ["input_ids", "attention_mask"])],
                                    {"input_ids": f32(2, 3), "attention_mask": f32(2, 3)}))  # fmt: skip
    with pytest.raises(InvalidInput, match=r"takes 2 input\(s\) \['input_ids', 'attention_mask'\], it was given 1"):
        converted(torch.zeros(2, 3))
