"""Issue #12, "small files that allocate huge memory" and "NaN/Inf ONNX weights", at the io level.

Every ONNX op the importer can make build a tensor from a shape is tried with a size that would need gigabytes
(run these under ``ulimit -d`` to see that nothing is allocated: without the bounds, the conversion fails on the
allocation instead of being refused). Also: the meta-device shape oracle agrees with the real ops, one by one;
ops that build from shapes in ways we cannot bound are not converted; an architecture's parameters are counted,
and its shapes compared with the file's header, before it is built; NaN/Inf weights are refused in ONNX as in
safetensors (the same problem).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.torch import save_file

from _model_bombs import (
    BOMBS,
    GENERATORS,
    NON_FINITE,
    add_to_x,
    bomb,
    f32,
    fill,
    generators_graph,
    i64,
    linear_graph,
    onnx_graph,
)
from api.isolation import run_isolated
from core.errors import InvalidInput, LimitExceeded
from core.io.limits import DEFAULT_LIMITS, UNLIMITED, LoadLimits
from core.io.model_files import validate_model_file
from core.io.onnx import onnx_to_torch
from core.io.onnx.bounds import fold_shape
from core.io.onnx.ops import SIMPLE
from core.io.onnx.transformer_ops import MULTI_OUTPUT
from core.io.zoo import build_model

CAP = DEFAULT_LIMITS.max_constant_elements


@pytest.mark.parametrize("name", list(BOMBS))
def test_onnx_bombs_are_refused_before_allocating(name: str, tmp_path: Path) -> None:
    _, _, node, shape = BOMBS[name]
    path = tmp_path / "bomb.onnx"
    onnx.save(bomb(name), str(path))
    assert path.stat().st_size < 3000  # a few hundred bytes that would allocate gigabytes
    with pytest.raises(LimitExceeded) as ei:
        validate_model_file(path)
    err = ei.value
    assert err.status == 413 and err.type == "limit-exceeded"
    assert f"node {node!r}" in err.detail, err.detail
    assert f"{math.prod(shape):,}" in err.detail or "folded from the graph would hold" in err.detail, err.detail
    assert f"over the limit of {CAP:,} (ARBORIST_MAX_CONSTANT_ELEMENTS)" in err.detail, err.detail
    assert err.errors[0]["loc"] == ["model", "nodes", node]


def test_bomb_names_the_shape_and_the_size() -> None:
    with pytest.raises(LimitExceeded) as ei:
        onnx_to_torch(bomb("constant-of-shape"))
    assert ei.value.detail == (
        "ConstantOfShape node 'big' would build a [60000, 60000] tensor of 3,600,000,000 elements, "
        "over the limit of 134,217,728 (ARBORIST_MAX_CONSTANT_ELEMENTS)"
    )
    with pytest.raises(LimitExceeded, match=r"Expand node 'big' would build at least a \[60000, 60000\] tensor"):
        onnx_to_torch(bomb("expand-of-input"))


def test_folded_constants_are_bounded_all_together() -> None:
    """Three constants of 400 elements each, each within a cap of 1000 but not all together."""
    proto = onnx_graph(
        [fill("s", "a"), fill("s", "b"), fill("s", "c"),
         helper.make_node("Add", ["a", "b"], ["ab"], name="ab"), add_to_x("ab")],
        {"s": i64(400)},
    )  # fmt: skip
    with pytest.raises(LimitExceeded, match=r"with ConstantOfShape node 'c', the constants folded from the graph "
                       r"would hold 1,200 elements, over the limit of 1,000"):  # fmt: skip
        onnx_to_torch(proto, LoadLimits(max_constant_elements=1000))
    onnx_to_torch(proto, LoadLimits(max_constant_elements=1600))  # a, b, c and a + b: at the limit, fine
    onnx_to_torch(proto, UNLIMITED)


def test_small_folds_still_work() -> None:
    """Folding within the bounds gives the same values as before: a ConstantOfShape-built bias, an int fill."""
    proto = onnx_graph(
        [fill("s", "b", value=0.5), fill("n", "k", value=3), helper.make_node("Cast", ["k"], ["kf"], to=1),
         helper.make_node("Mul", ["b", "kf"], ["bias"]), helper.make_node("Add", ["x", "bias"], ["y"])],
        {"s": i64(1, 4), "n": i64(4)},
    )  # fmt: skip
    model = onnx_to_torch(proto)
    x = torch.randn(1, 4)
    torch.testing.assert_close(model(x), x + 1.5)


def test_generators_we_cannot_bound_are_not_converted() -> None:
    """Ops that build tensors from shapes or counts the importer does not bound are refused as unsupported."""
    with pytest.raises(InvalidInput) as ei:
        onnx_to_torch(generators_graph())
    assert ei.value.detail == f"unsupported ONNX op(s): {', '.join(GENERATORS)}"
    assert not isinstance(ei.value, LimitExceeded)


# --------------------------------------------------------------------------------------- the meta oracle


#: one call of every stateless op with constant inputs: (attributes, inputs); the oracle must agree with the op
_X = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
FOLDS: dict[str, tuple[dict, list]] = {
    "Relu": ({}, [_X]),
    "LeakyRelu": ({"alpha": 0.1}, [_X]),
    "Sigmoid": ({}, [_X]),
    "Tanh": ({}, [_X]),
    "Clip": ({}, [_X, f32(0.5)[0], f32(2.0)[0]]),
    "Softmax": ({"axis": 1}, [_X]),
    "LogSoftmax": ({}, [_X]),
    "Identity": ({}, [_X]),
    "Dropout": ({}, [_X]),
    "Add": ({}, [_X, f32(1, 2, 3, 4)]),
    "Sub": ({}, [_X[:, :1], _X]),
    "Mul": ({}, [_X.reshape(2, 3, 4, 1), f32(1, 2, 3, 4, 5)]),
    "Div": ({}, [i64(7, 8, 9), i64(2)]),
    "Concat": ({"axis": 1}, [_X, _X[:, :2]]),
    "Flatten": ({"axis": 2}, [_X]),
    "Reshape": ({}, [_X, i64(4, 0, -1)]),
    "Transpose": ({"perm": [2, 0, 1]}, [_X]),
    "Unsqueeze": ({}, [_X, i64(0, 4)]),
    "Squeeze": ({}, [_X[:1], i64(0)]),
    "Shape": ({"start": 1}, [_X]),
    "Gather": ({"axis": 1}, [_X, i64(2, 0, 1, 1, 0)]),
    "Cast": ({"to": TensorProto.DOUBLE}, [_X]),
    "ConstantOfShape": ({"value": helper.make_tensor("v", TensorProto.FLOAT, [1], [2.0])}, [i64(3, 5)]),
    "Expand": ({}, [_X[:, :1], i64(5, 2, 3, 4)]),
    "Slice": ({}, [_X, i64(-1, 0), i64(-100, 3), i64(2, 1), i64(-2, 2)]),
    "Pad": ({}, [_X, i64(0, 1, 2, 0, 3, 4)]),
    "MaxPool": ({"kernel_shape": [2], "strides": [2], "pads": [1, 0]}, [_X]),
    "AveragePool": ({"kernel_shape": [3], "pads": [1, 1]}, [_X]),
    "GlobalAveragePool": ({}, [_X]),
    "GlobalMaxPool": ({}, [_X]),
    "ReduceMean": ({"keepdims": 0}, [_X, i64(1)]),
    "ReduceSum": ({}, [_X, i64(0, 2)]),
    "ReduceMax": ({"keepdims": 0}, [_X]),
    "Erf": ({}, [_X]),
    "Gelu": ({"approximate": "tanh"}, [_X]),
    "Pow": ({}, [_X, f32(2.0)[0]]),
    "IsNaN": ({}, [_X]),
    "LayerNormalization": ({"axis": 1}, [_X, _X[0], f32(0.5)[0]]),
    "Not": ({}, [_X > 1]),
    "And": ({}, [_X > 1, (_X < 2)[:1]]),
    "Or": ({}, [(_X > 1).reshape(2, 3, 4, 1), _X[0, 0] < 2]),
    "Equal": ({}, [i64(1, 2, 3), i64(2)]),
    "Greater": ({}, [_X, _X[:, :1]]),
    "GreaterOrEqual": ({}, [_X, f32(1.0)[0]]),
    "Less": ({}, [_X, _X[:, :1, :1]]),
    "LessOrEqual": ({}, [_X[:1], _X]),
    "Where": ({}, [(_X > 1)[:, :1], _X, f32(0.0)[0]]),
    "Max": ({}, [_X, _X[:, :1], f32(1.0)]),
    "Min": ({}, [_X[:1]]),
    "Range": ({}, [np.array(2, np.int64), np.array(11, np.int64), np.array(3, np.int64)]),
    "GatherElements": ({"axis": 2}, [_X, i64(0, 3, -1, 2).reshape(1, 1, 4).repeat(3, axis=1)]),
    "GatherND": ({"batch_dims": 1}, [_X, i64(0, 1, 2, 3).reshape(2, 1, 2)]),
    "Split": ({"axis": 2, "#outputs": 2}, [_X]),
}


def test_every_stateless_op_has_a_fold_case() -> None:
    assert set(FOLDS) == set(SIMPLE), "a new op needs a row in FOLDS (its folded size must be known first)"


@pytest.mark.parametrize("op", list(FOLDS))
def test_meta_oracle_agrees_with_the_op(op: str) -> None:
    a, values = FOLDS[op]
    k = [torch.as_tensor(np.asarray(v)) for v in values]
    fn = SIMPLE[op](a, 18, k)
    out = fn(None, *k)
    if op in MULTI_OUTPUT:  # folded without the oracle: its outputs together are its input
        assert sum(o.numel() for o in out) == k[0].numel()
        return
    real = tuple(out.shape) if isinstance(out, torch.Tensor) else np.shape(out)
    assert fold_shape(op, fn, k) == real


# --------------------------------------------------------------------------------------- NaN / Inf weights


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_onnx_non_finite_weights_are_refused_like_safetensors(case: str, tmp_path: Path) -> None:
    proto, name = NON_FINITE[case]
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(InvalidInput) as ei:
        validate_model_file(path)
    err = ei.value
    assert type(err) is InvalidInput and err.status == 422  # the problem safetensors NaN weights get
    assert err.detail == f"the weights hold NaN or Inf values in 1 tensor(s): {name}"
    assert err.errors == [{"loc": ["state_dict", name], "msg": "NaN or Inf values", "type": "non_finite"}]


def test_safetensors_non_finite_is_the_same_problem(tmp_path: Path) -> None:
    sd = build_model("mlp", in_features=4, hidden=[3], num_classes=2).state_dict()
    sd["layers.1.weight"][0, 0] = float("nan")
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(InvalidInput) as ei:
        validate_model_file(tmp_path / "m.safetensors", arch="mlp", arch_kwargs={"in_features": 4, "hidden": [3],
                                                                                  "num_classes": 2})  # fmt: skip
    assert ei.value.detail == "the weights hold NaN or Inf values in 1 tensor(s): layers.1.weight"
    assert ei.value.errors[0]["type"] == "non_finite"


def test_infinite_constants_that_are_not_weights_are_fine() -> None:
    """An additive mask of -inf (attention-style) is a constant, not a weight: accepted and computed."""
    mask = np.array([[0.0, -np.inf, 0.0, -np.inf]], np.float32)
    model = onnx_to_torch(onnx_graph([helper.make_node("Add", ["x", "mask"], ["y"])], {"mask": mask}))
    out = model(torch.zeros(1, 4))
    assert out[0, 1] == -math.inf and out[0, 0] == 0


# --------------------------------------------------------------------------------------- architectures


def _mlp_file(tmp_path: Path, **kwargs: object) -> Path:
    path = tmp_path / "mlp.safetensors"
    save_file(build_model("mlp", **kwargs).state_dict(), path)
    return path


def test_huge_arch_kwargs_are_refused_by_parameter_count(tmp_path: Path) -> None:
    """The issue's 19 KB file: arch_kwargs ask for 1.5 billion parameters. Counted on ``meta``, refused."""
    path = _mlp_file(tmp_path, in_features=64, hidden=[32], num_classes=10)
    kwargs = {"in_features": 50000, "hidden": [30000]}
    with pytest.raises(LimitExceeded) as ei:
        validate_model_file(path, arch="mlp", arch_kwargs=kwargs)
    expected = 50000 * 30000 + 30000 + 30000 * 10 + 10
    assert ei.value.detail == (
        f"architecture 'mlp' with {kwargs} has {expected:,} parameters, "
        f"over the limit of {2**28:,} (ARBORIST_MAX_MODEL_PARAMETERS)"
    )
    assert ei.value.errors[0]["loc"] == ["arch_kwargs"]


def _validate_mlp(path: Path, kwargs: dict) -> object:
    return validate_model_file(path, arch="mlp", arch_kwargs=kwargs)


def test_architecture_is_compared_with_the_header_before_it_is_built(tmp_path: Path) -> None:
    """Within the parameter cap (200M parameters: 800 MB at float32) but not what the file holds: refused from the
    shapes alone, in a process that could not allocate the model (256 MiB limit)."""
    path = _mlp_file(tmp_path, in_features=64, hidden=[32], num_classes=10)
    kwargs = {"in_features": 20000, "hidden": [10000]}
    with pytest.raises(InvalidInput, match=r"do not match the architecture: shape mismatches 3") as ei:
        run_isolated(_validate_mlp, path, kwargs, memory_limit=256 * 2**20)
    assert not isinstance(ei.value, LimitExceeded)


def test_parameter_cap_applies_to_onnx_too(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(linear_graph(), str(path))
    assert validate_model_file(path).num_parameters == 15
    with pytest.raises(LimitExceeded, match=r"the ONNX model has 15 parameters, over the limit of 14"):
        validate_model_file(path, limits=LoadLimits(max_parameters=14))


def test_lying_safetensors_header_is_refused_before_the_architecture_is_built(tmp_path: Path) -> None:
    """A header that claims the architecture's huge shapes, but no data for them: the header check comes first."""
    header = {"layers.1.weight": {"dtype": "F32", "shape": [30000, 50000], "data_offsets": [0, 6 * 10**9]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(InvalidInput, match="outside the data section"):
        validate_model_file(path, arch="mlp", arch_kwargs={"in_features": 50000, "hidden": [30000]},
                            limits=LoadLimits(max_parameters=None))  # fmt: skip
