"""ONNX graphs that are small files but bad inputs (issue #12): memory bombs, NaN/Inf weights. Shared by the io
tests (``tests/test_onnx_bombs.py``) and the HTTP ones (``tests/api/test_api_bad_inputs_memory.py``)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BIG = 60000  # [BIG, BIG] float32: 14.4 GB


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def f32(*v: float) -> np.ndarray:
    return np.array(v, dtype=np.float32)


def onnx_graph(nodes: list, inits: dict[str, np.ndarray], opset: int = 17) -> onnx.ModelProto:
    """A graph of ``nodes`` over input ``x`` [1, 4] and the initializers ``inits``; its output is ``y``."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def fill(shape_input: str, out: str, value: float | int = 1.0, name: str | None = None) -> onnx.NodeProto:
    """``ConstantOfShape`` filled with ``value`` (float32 or int64)."""
    dtype = TensorProto.INT64 if isinstance(value, int) else TensorProto.FLOAT
    tensor = helper.make_tensor("v", dtype, [1], [value])
    return helper.make_node("ConstantOfShape", [shape_input], [out], name=name or out, value=tensor)


def add_to_x(value: str) -> onnx.NodeProto:
    return helper.make_node("Add", ["x", value], ["y"], name="use")


def _doubling() -> tuple[list, dict]:
    nodes = [fill("s", "c0")]
    for i in range(1, 9):
        nodes.append(helper.make_node("Concat", [f"c{i - 1}", f"c{i - 1}"], [f"c{i}"], name=f"c{i}", axis=0))
    return [*nodes, add_to_x("c8")], {"s": i64(2**20)}


#: name -> (nodes, initializers, the node refused, the shape it reports): each file is a few hundred bytes
BOMBS = {
    "constant-of-shape": (
        [fill("s", "big"), add_to_x("big")], {"s": i64(BIG, BIG)}, "big", [BIG, BIG],
    ),
    "constant-of-shape-int": (
        [fill("s", "big", value=7), add_to_x("big")], {"s": i64(10**9)}, "big", [10**9],
    ),
    "expand": (
        [helper.make_node("Expand", ["one", "s"], ["big"], name="big"), add_to_x("big")],
        {"one": f32(1.0), "s": i64(BIG, BIG)}, "big", [BIG, BIG],
    ),
    "broadcast-add": (
        [fill("col", "a"), fill("row", "b"), helper.make_node("Add", ["a", "b"], ["big"], name="big"), add_to_x("big")],
        {"col": i64(BIG, 1), "row": i64(1, BIG)}, "big", [BIG, BIG],
    ),
    "broadcast-mul-3d": (
        [fill("s1", "a"), fill("s2", "b"), fill("s3", "c"), helper.make_node("Mul", ["a", "b"], ["ab"], name="ab"),
         helper.make_node("Mul", ["ab", "c"], ["big"], name="big"), add_to_x("big")],
        {"s1": i64(2000, 1, 1), "s2": i64(1, 2000, 1), "s3": i64(1, 1, 2000)}, "big", [2000, 2000, 2000],
    ),
    "pad": (
        [helper.make_node("Pad", ["one", "p"], ["big"], name="big"), add_to_x("big")],
        {"one": f32(1.0), "p": i64(0, 10**9)}, "big", [10**9 + 1],
    ),
    "gather": (
        [fill("rs", "row"), fill("is", "idx", value=0), helper.make_node("Gather", ["row", "idx"], ["big"], name="big"),
         add_to_x("big")],
        {"rs": i64(1, 100000), "is": i64(100000)}, "big", [100000, 100000],
    ),
    "concat-doubling": (*_doubling(), "c7", [2**27]),  # c0..c7 together: over the cap one step before c8 alone
    "reshape-of-huge-constant": (
        [fill("s", "big"), helper.make_node("Reshape", ["big", "flat"], ["r"], name="r"), add_to_x("r")],
        {"s": i64(BIG, BIG), "flat": i64(-1)}, "big", [BIG, BIG],
    ),
    "cast-of-huge-constant": (
        [fill("s", "big", value=1), helper.make_node("Cast", ["big"], ["f"], name="f", to=TensorProto.FLOAT),
         add_to_x("f")],
        {"s": i64(BIG, BIG)}, "big", [BIG, BIG],
    ),
    "expand-of-input": (  # not folded: x is the graph input, but the shape asks for 3.6e9 elements at least
        [helper.make_node("Expand", ["x", "s"], ["y"], name="big")], {"s": i64(BIG, BIG)}, "big", [BIG, BIG],
    ),
    "range": (  # its length comes from the operands' values: 10**12 elements from three scalars
        [helper.make_node("Range", ["start", "limit", "delta"], ["big"], name="big"),
         helper.make_node("Cast", ["big"], ["f"], to=TensorProto.FLOAT), add_to_x("f")],
        {"start": np.array(0, np.int64), "limit": np.array(10**12, np.int64), "delta": np.array(1, np.int64)},
        "big", [10**12],
    ),
    "pad-of-input": (
        [helper.make_node("Pad", ["x", "p"], ["y"], name="big")], {"p": i64(0, 0, 10**5, 10**5)}, "big",
        [10**5 + 1, 10**5 + 1],
    ),
}  # fmt: skip


def bomb(name: str) -> onnx.ModelProto:
    nodes, inits, _, _ = BOMBS[name]
    return onnx_graph(nodes, inits)


#: ops that build tensors from shapes or counts in ways the importer does not bound: not converted at all
GENERATORS = ("EyeLike", "OneHot", "RandomNormal", "RandomUniformLike", "Resize", "Tile")


def generators_graph() -> onnx.ModelProto:
    """Every op of :data:`GENERATORS`, each asking for gigabytes."""
    nodes = [
        helper.make_node("Tile", ["x", "reps"], ["t"]),
        helper.make_node("Resize", ["x", "", "scales"], ["z"]),
        helper.make_node("RandomNormal", [], ["n"], shape=[BIG, BIG]),
        helper.make_node("RandomUniformLike", ["x"], ["u"]),
        helper.make_node("EyeLike", ["x"], ["e"]),
        helper.make_node("OneHot", ["idx", "depth", "vals"], ["o"]),
        helper.make_node("Identity", ["x"], ["y"]),
    ]
    inits = {"reps": i64(BIG, BIG), "scales": f32(1.0, 1e6), "idx": i64(1), "depth": i64(10**9),
             "vals": f32(0.0, 1.0)}  # fmt: skip
    return onnx_graph(nodes, inits)


def over_memory_graph(side: int = 8192) -> onnx.ModelProto:
    """One float64 ``ConstantOfShape [side, side]``: 2**26 elements (512 MiB), within the default element cap: only
    a validation memory limit below that stops it."""
    value = helper.make_tensor("v", TensorProto.DOUBLE, [1], [1.0])
    node = helper.make_node("ConstantOfShape", ["s"], ["big"], name="big", value=value)
    return onnx_graph([node, add_to_x("big")], {"s": i64(side, side)})


# --------------------------------------------------------------------------------------- NaN / Inf weights


def linear_graph(**overrides: np.ndarray) -> onnx.ModelProto:
    inits = {"fc.weight": np.ones((3, 4), np.float32), "fc.bias": np.zeros(3, np.float32)} | overrides
    return onnx_graph([helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], transB=1)], inits)


def poisoned(shape: tuple[int, ...], value: float) -> np.ndarray:
    a = np.ones(shape, np.float32)
    a.flat[1] = value
    return a


def conv_bn_graph(w: np.ndarray, var: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv.weight"], ["c"], kernel_shape=[1, 1]),
         helper.make_node("BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.mean", "bn.var"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(v, k) for k, v in {
            "conv.weight": w, "bn.weight": f32(1, 1), "bn.bias": f32(0, 0), "bn.mean": f32(0, 0), "bn.var": var,
        }.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def constant_weight_graph(value: float) -> onnx.ModelProto:
    """The weight comes from a Constant node, not an initializer."""
    w = numpy_helper.from_array(poisoned((4, 3), value), "wv")
    return onnx_graph(
        [helper.make_node("Constant", [], ["w"], value=w), helper.make_node("MatMul", ["x", "w"], ["y"])], {}
    )


NON_FINITE = {
    "gemm-weight-nan": (linear_graph(**{"fc.weight": poisoned((3, 4), np.nan)}), "layers.fc.weight"),
    "gemm-bias-inf": (linear_graph(**{"fc.bias": f32(0, np.inf, 0)}), "layers.fc.bias"),
    "conv-weight-neg-inf": (conv_bn_graph(poisoned((2, 2, 1, 1), -np.inf), f32(1, 1)), "layers.conv.weight"),
    "bn-running-var-nan": (conv_bn_graph(np.ones((2, 2, 1, 1), np.float32), f32(1, np.nan)), "layers.bn.running_var"),
    "constant-node-weight-nan": (constant_weight_graph(np.nan), "layers.w.weight"),
}  # fmt: skip
