"""Single-op ONNX graphs for the importer's tests: a builder typed by onnx's shape inference, and one graph per
transformer op that the spec forbids (shared by ``tests/test_onnx_transformers.py`` and the HTTP test)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(0)


def f32(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def graph(nodes: list, feeds: dict[str, np.ndarray], inits: dict | None = None, opset: int = 20) -> onnx.ModelProto:
    """A graph over ``feeds`` whose outputs are the last node's, typed by onnx's shape inference."""
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in feeds.items()]  # fmt: skip
    g = helper.make_graph(nodes, "g", inputs, [], [numpy_helper.from_array(np.asarray(v), k)
                                                  for k, v in (inits or {}).items()])  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    try:
        info = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    except Exception:  # noqa: BLE001 (a graph built to be refused: its outputs get a placeholder type)
        info = {}
    for o in nodes[-1].output:
        v = info.get(o)
        ok = v is not None and v.type.tensor_type.HasField("shape")
        model.graph.output.append(v if ok else helper.make_tensor_value_info(o, TensorProto.FLOAT, ["d"]))
    return model


def node(op: str, ins: list[str], outs: int = 1, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, ins, ["y"] if outs == 1 else [f"y{i}" for i in range(outs)], **attrs)


B = np.array


BAD_CASES: dict[str, tuple[list, dict, str]] = {  # name -> (nodes, feeds, the message)
    "gelu-approximate": ([node("Gelu", ["x"], approximate="fast")], {"x": f32(2, 3)}, "approximate must be"),
    "erf-two-inputs": ([node("Erf", ["x", "x"])], {"x": f32(2)}, "invalid ONNX model"),
    "pow-unknown-attribute": ([node("Pow", ["x", "x"], alpha=1.0)], {"x": f32(2)}, "Unrecognized attribute"),
    "isnan-unknown-attribute": ([node("IsNaN", ["x"], axis=0)], {"x": f32(2)}, "Unrecognized attribute"),
    "layernorm-axis": ([node("LayerNormalization", ["x", "x"], axis=3)], {"x": f32(2, 3)}, "axis 3 is out of range"),
    "layernorm-stash-type": ([node("LayerNormalization", ["x", "x"], stash_type=7)], {"x": f32(2, 3)}, "stash_type"),
    "not-two-inputs": ([node("Not", ["c", "c"])], {"c": B([True])}, "invalid ONNX model"),
    "and-unknown-attribute": ([node("And", ["c", "c"], axis=1)], {"c": B([True])}, "Unrecognized attribute"),
    "or-one-input": ([node("Or", ["c"])], {"c": B([True])}, "invalid ONNX model"),
    "equal-unknown-attribute": ([node("Equal", ["x", "x"], axis=1)], {"x": f32(2)}, "Unrecognized attribute"),
    "greater-one-input": ([node("Greater", ["x"])], {"x": f32(2)}, "invalid ONNX model"),
    "greater-or-equal-attribute": ([node("GreaterOrEqual", ["x", "x"], k=1)], {"x": f32(2)}, "Unrecognized"),
    "less-three-inputs": ([node("Less", ["x", "x", "x"])], {"x": f32(2)}, "invalid ONNX model"),
    "less-or-equal-attribute": ([node("LessOrEqual", ["x", "x"], k=1)], {"x": f32(2)}, "Unrecognized"),
    "where-two-inputs": ([node("Where", ["c", "x"])], {"c": B([True]), "x": f32(1)}, "invalid ONNX model"),
    "max-no-input": ([node("Max", [])], {}, "invalid ONNX model"),
    "min-unknown-attribute": ([node("Min", ["x"], axis=0)], {"x": f32(2)}, "Unrecognized attribute"),
    "range-not-scalars": ([node("Range", ["a", "b", "b"])], {"a": f32(2), "b": B(1.0, np.float32)},
                          "must be scalars"),
    "gather-elements-rank": ([node("GatherElements", ["x", "i"])], {"x": f32(2, 3), "i": B([0, 1], np.int64)},
                             "indices of rank 1 for data of rank 2"),
    "gather-elements-axis": ([node("GatherElements", ["x", "i"], axis=2)],
                             {"x": f32(2, 3), "i": B([[0], [1]], np.int64)}, "axis 2 is out of range"),
    "gather-nd-batch-dims": ([node("GatherND", ["x", "i"], batch_dims=2)],
                             {"x": f32(2, 3), "i": B([[0], [1]], np.int64)}, "batch_dims 2 must be below"),
    "split-axis": ([node("Split", ["x"], 2, axis=2)], {"x": f32(2, 4)}, "axis 2 is out of range"),
    "split-num-outputs": ([node("Split", ["x"], 2, num_outputs=3)], {"x": f32(6)}, "num_outputs 3 but the node"),
}  # fmt: skip


def bad_model(case: str) -> onnx.ModelProto:
    nodes, feeds, _ = BAD_CASES[case]
    return graph(nodes, feeds, opset=20)
