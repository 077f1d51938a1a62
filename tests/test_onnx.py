"""ONNX export and import: zoo round trips, op semantics against onnx's reference evaluator,
refusals (external data, path-like names, unsupported ops), vmap(grad), atomic writes."""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from safetensors.torch import load, save
from torch import nn
from torch.func import functional_call, grad, vmap

from core.errors import InvalidInput, UnsafeFormat
from core.io.onnx import OnnxModule, onnx_to_torch
from core.io.onnx.export import _legacy, export_onnx
from core.io.zoo import build_model

# torch.export's internals warn about a deprecated pytree spec; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
ZOO = {
    "mlp": (dict(in_features=64, hidden=[32, 16]), (64,)),
    "lenet5": (dict(input_size=8), (1, 8, 8)),
    "resnet20": (dict(width=4), (3, 8, 8)),  # option A: strided slice + channel pad
    "mobilenet_v1": (dict(width_mult=0.25, num_classes=10, small_input=True), (3, 8, 8)),
}


def _zoo_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, **ZOO[arch][0])
    for m in model.modules():  # non-trivial BN statistics, so a dropped or misread BN shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each zoo model exported once (dynamo exporter, from a batch-1 example as runs do)."""
    d = tmp_path_factory.mktemp("onnx")
    out = {}
    for arch, (_, shape) in ZOO.items():
        model = _zoo_model(arch)
        out[arch] = (model, export_onnx(model, torch.randn(1, *shape), d / f"{arch}.onnx"))
    return out


def _expected_key(name: str) -> str:
    return re.sub(r"^layers\.", "", name).replace(".", "_")


@pytest.mark.parametrize("arch", list(ZOO))
def test_round_trip(arch, exported):
    model, path = exported[arch]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert "BatchNormalization" in {n.op_type for n in proto.graph.node} or arch in ("mlp", "lenet5")

    converted = onnx_to_torch(path).eval()
    x = torch.randn(5, *ZOO[arch][1])  # another batch size than the export's
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)
    # the same Linear/Conv weights, same values, under the original names
    original = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    ours = {n: m for n, m in converted.layers.items() if isinstance(m, PRUNABLE)}
    assert sorted(ours) == sorted(_expected_key(n) for n in original)
    for name, m in original.items():
        c = ours[_expected_key(name)]
        assert type(c) is type(m)
        torch.testing.assert_close(c.weight, m.weight, atol=0, rtol=0)
        assert (c.bias is None) == (m.bias is None)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in converted.modules()) == n_bn


def test_exported_graph_matches_reference_evaluator(exported):
    model, path = exported["lenet5"]
    x = torch.randn(3, 1, 8, 8)
    (y,) = ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(y, model(x).detach().numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "resnet20", "mobilenet_v1"])
def test_legacy_exporter_graphs_import(arch, tmp_path):
    """TorchScript-exported files (the common upload) have Flatten/GlobalAveragePool and, for
    option-A shortcuts, Shape→Gather→…→Pad shape arithmetic."""
    model = _zoo_model(arch)
    x = torch.randn(4, *ZOO[arch][1])
    path = tmp_path / "legacy.onnx"
    onnx.save(_legacy(model, x[:2], path), str(path))
    converted = onnx_to_torch(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)


def test_vmap_grad_through_converted_model(tmp_path):
    model = _zoo_model("resnet20")
    path = tmp_path / "r.onnx"
    onnx.save(_legacy(model, torch.randn(2, 3, 8, 8), path), str(path))  # has runtime shape ops
    converted = onnx_to_torch(path).eval()
    params = {n: p.detach() for n, p in converted.named_parameters()}
    buffers = dict(converted.named_buffers())

    def loss(p, xb, yb):
        return F.cross_entropy(functional_call(converted, (p, buffers), (xb,)), yb)

    x, y = torch.randn(3, 2, 3, 8, 8), torch.randint(0, 10, (3, 2))
    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    weights = [n for n, m in converted.named_modules() if isinstance(m, PRUNABLE)]
    assert len(weights) == 20
    for i in range(3):
        ref = grad(loss)(params, x[i], y[i])
        for n in params:
            torch.testing.assert_close(g[n][i], ref[n], rtol=1e-4, atol=1e-5)
    # and the gradient of the original model agrees (same weights, same function)
    orig = {n: p.detach() for n, p in model.named_parameters()}
    ref = grad(lambda p: F.cross_entropy(functional_call(model, p, (x[0],)), y[0]))(orig)
    torch.testing.assert_close(g["layers.fc.weight"][0], ref["fc.weight"], rtol=1e-4, atol=1e-5)


def test_converted_model_exports_again_and_keeps_names(exported, tmp_path):
    converted = onnx_to_torch(exported["resnet20"][1]).eval()
    path = export_onnx(converted, torch.randn(1, 3, 8, 8), tmp_path / "again.onnx")
    again = onnx_to_torch(path).eval()
    assert list(again.state_dict()) == list(converted.state_dict())
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), converted(x), atol=1e-5, rtol=1e-5)


def test_state_dict_safetensors_and_deepcopy(exported):
    model, path = exported["mobilenet_v1"]
    converted = onnx_to_torch(path).eval()
    fresh = onnx_to_torch(path)
    state = load(save(converted.state_dict()))
    assert all(k.startswith("layers.") for k in state)  # no graph constants in the state dict
    fresh.load_state_dict(state, strict=True)
    twin = copy.deepcopy(converted)  # layers are looked up by name, so a copy runs its own weights
    with torch.no_grad():
        twin.layers["fc"].weight.zero_()
        twin.layers["fc"].bias.fill_(1.0)
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(twin(x), torch.ones(2, 10))
        torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------- hand-built graphs vs onnx.reference


def _model(nodes, inputs, inits=None, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


rng = np.random.default_rng(0)
W4 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
CASES = {
    "conv_asymmetric_pads": (
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 1, 2, 1], strides=[2, 1])],
        {"w": W4},
    ),
    "conv_same_upper_stride2": (
        [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
        {"w": W4},
    ),
    "conv_depthwise_dilated": (
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=3, dilations=[2, 2], pads=[2, 2, 2, 2])],
        {"w": rng.standard_normal((6, 1, 3, 3)).astype(np.float32), "b": rng.standard_normal(6).astype(np.float32)},
    ),
    "maxpool_same": (
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")],
        {},
    ),
    "maxpool_asym": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[1, 0, 0, 1])], {}),
    "maxpool_ceil": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)], {}),
    "avgpool_exclude_pad": (
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        {},
    ),
    "gemm_trans_alpha_beta_matrix_c": (
        [
            helper.make_node("Flatten", ["x"], ["f"]),
            helper.make_node("Transpose", ["f"], ["ft"]),
            helper.make_node("Gemm", ["ft", "b", "c"], ["y"], transA=1, alpha=0.5, beta=2.0),
        ],
        {"b": rng.standard_normal((108, 5)).astype(np.float32), "c": rng.standard_normal((2, 5)).astype(np.float32)},
    ),
    "matmul_add_softmax11": (
        [
            helper.make_node("Reshape", ["x", "s"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["mm"]),
            helper.make_node("Add", ["bias", "mm"], ["a"]),
            helper.make_node("Softmax", ["a"], ["y"], axis=1),
        ],
        {
            "s": np.array([0, 3, -1]),
            "w": rng.standard_normal((36, 7)).astype(np.float32),
            "bias": rng.standard_normal(7).astype(np.float32),
        },
    ),
    "slice_negative_step_pad_reflect": (
        [
            helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["s"]),
            helper.make_node("Pad", ["s", "p"], ["y"], mode="reflect"),
        ],
        {
            "st": np.array([-1, 0]),
            "en": np.array([-100, 6]),
            "ax": np.array([3, 2]),
            "sp": np.array([-2, 1]),
            "p": np.array([0, 0, 1, 2, 0, 0, 1, 0]),
        },
    ),
    "shape_gather_concat_reshape": (
        [
            helper.make_node("Shape", ["x"], ["sh"]),
            helper.make_node("Gather", ["sh", "i"], ["b"], axis=0),
            helper.make_node("Concat", ["b", "m1"], ["ns"], axis=0),
            helper.make_node("Reshape", ["x", "ns"], ["r"]),
            helper.make_node("Gather", ["r", "j"], ["y"], axis=1),
        ],
        {"i": np.array([0]), "m1": np.array([-1]), "j": np.array([[-1, 0], [5, 3]])},
    ),
    "clip_leaky_sigmoid_tanh_sub_div": (
        [
            helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
            helper.make_node("LeakyRelu", ["c"], ["l"], alpha=0.3),
            helper.make_node("Sigmoid", ["l"], ["s"]),
            helper.make_node("Tanh", ["x"], ["t"]),
            helper.make_node("Sub", ["s", "t"], ["d"]),
            helper.make_node("Div", ["d", "two"], ["y"]),
        ],
        {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32), "two": np.array(2.0, np.float32)},
    ),
    "global_pool_unsqueeze_squeeze_logsoftmax": (
        [
            helper.make_node("GlobalAveragePool", ["x"], ["g"]),
            helper.make_node("Squeeze", ["g", "ax"], ["q"]),
            helper.make_node("Unsqueeze", ["q", "ax0"], ["u"]),
            helper.make_node("LogSoftmax", ["u"], ["y"], axis=-1),
        ],
        {"ax": np.array([2, 3]), "ax0": np.array([0])},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_semantics_match_reference(case):
    nodes, inits = CASES[case]
    proto = _model(nodes, {"x": [2, 3, 6, 6]}, inits)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    (ref,) = ReferenceEvaluator(proto).run(None, {"x": x})
    proto.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ref.shape)
    )  # checker wants one
    converted = onnx_to_torch(proto)
    with torch.no_grad():
        got = converted(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5, rtol=1e-5)
    if case == "matmul_add_softmax11":  # bias folded into the Linear: one step, no Add
        assert [s.op for s in converted.steps] == ["Reshape", "MatMul", "Softmax"]
        assert isinstance(converted.layers["w"], nn.Linear) and converted.layers["w"].bias is not None


# ----------------------------------------------------------------- refusals


def _tiny() -> onnx.ModelProto:
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": [1, 4]}, {"w": np.ones((4, 2), np.float32)})
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]))
    return proto


def test_external_data_file_is_refused(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save_model(_tiny(), str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    assert (tmp_path / "w.bin").exists()
    with pytest.raises(UnsafeFormat, match="external data"):
        onnx_to_torch(path)


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "weights.bin"])
def test_external_locations_are_refused_in_memory(location):
    proto = _tiny()
    t = proto.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    with pytest.raises(UnsafeFormat):
        onnx_to_torch(proto)


@pytest.mark.parametrize("name", ["../w", "a/../../b", "/abs/w", "C:\\w"])
def test_path_like_tensor_names_are_refused(name):
    proto = _tiny()
    proto.graph.initializer[0].name = name
    proto.graph.node[0].input[1] = name
    with pytest.raises(UnsafeFormat, match="path"):
        onnx_to_torch(proto)


def test_unsupported_ops_are_listed():
    nodes = [helper.make_node("Hardmax", ["x"], ["e"]), helper.make_node("Custom", ["e"], ["c"], domain="com.acme"),
             helper.make_node("Relu", ["c"], ["y"])]  # fmt: skip
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)],
    )  # fmt: skip
    with pytest.raises(InvalidInput) as e:
        onnx_to_torch(proto)
    assert not isinstance(e.value, UnsafeFormat)
    assert "Hardmax" in e.value.detail and "com.acme::Custom" in e.value.detail
    assert {err["loc"][1] for err in e.value.errors} == {"Hardmax", "com.acme::Custom"}


def test_invalid_files_are_invalid_input(tmp_path):
    with pytest.raises(InvalidInput, match="not found"):
        onnx_to_torch(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a protobuf\xff\xff\xff")
    with pytest.raises(InvalidInput):
        onnx_to_torch(garbage)
    broken = _tiny()
    broken.graph.node[0].input[0] = "undefined"  # the checker rejects it
    with pytest.raises(InvalidInput, match="invalid ONNX"):
        onnx_to_torch(broken)


# ----------------------------------------------------------------- export


class _Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        raise RuntimeError("boom")


def test_export_failure_leaves_nothing_behind(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(Exception):
        export_onnx(_Boom(), torch.randn(1, 2), path)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_export_restores_training_mode(tmp_path):
    model = build_model("mlp", in_features=4, hidden=[3], num_classes=2).train()
    out = export_onnx(model, torch.randn(1, 4), tmp_path / "sub" / "m.onnx")
    assert out.exists() and model.training
    assert isinstance(onnx_to_torch(out), OnnxModule)
