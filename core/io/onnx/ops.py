"""The ONNX ops the importer converts: the table of stateless ops, and the helpers ops and layers share.

Each factory in :data:`SIMPLE` gets (attributes, opset, known) — ``known[i]`` is input i's value when it is a
conversion-time constant, else None — and returns fn(module, *inputs). Constant operands such as shapes, axes and
clip bounds are read once there rather than on every forward. Weight-bearing ops (:data:`LAYERS`) become modules
in :mod:`core.io.onnx.build`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import Tensor

from core.errors import InvalidInput
from core.io.onnx.transformer_ops import HOST, OPS
from core.io.onnx.values import host, ints

Fn = Callable[..., Any]  # fn(module, *inputs) -> Tensor


# --------------------------------------------------------------------------- helpers


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def to_tensor(t: onnx.TensorProto) -> Tensor:
    return torch.from_numpy(numpy_helper.to_array(t).copy())


def torch_pads(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX ``[b1, b2, …, e1, e2, …]`` (first axis first) → F.pad's (last axis first), trimmed."""
    out = [p for b, e in zip(reversed(begins), reversed(ends)) for p in (b, e)]
    while out and out[-2:] == [0, 0]:
        out = out[:-2]
    return out


def same_pads(x: Tensor, kernel: list[int], strides: list[int], dil: list[int], upper: bool) -> list[int]:
    """Runtime ``auto_pad=SAME_*`` padding from the (logical, so vmap-safe) spatial size."""
    spatial = x.shape[2:]
    begins, ends = [], []
    for n, k, s, d in zip(spatial, kernel, strides, dil):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        begins.append(small if upper else total - small)
        ends.append(total - small if upper else small)
    return torch_pads(begins, ends)


def window(a: dict, kernel: list[int]) -> tuple[list[int], list[int], list[int], list[int], str]:
    d = len(kernel)
    pads = list(a.get("pads", [0] * 2 * d))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        pads = [0] * 2 * d
    return list(a.get("strides", [1] * d)), list(a.get("dilations", [1] * d)), pads[:d], pads[d:], auto


_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}  # fmt: skip


# --------------------------------------------------------------------------- stateless ops


def _axes_op(attr_name: str, since: int, body: Callable[..., Tensor]) -> Callable:
    """Ops whose ``axes`` moved from an attribute to input 1 at opset ``since``."""

    def factory(a: dict, opset: int, k: list) -> Fn:
        fixed = a.get(attr_name) if opset < since else ints(k[1] if len(k) > 1 else None)

        def fn(m: Any, x: Tensor, axes: Tensor | None = None) -> Tensor:
            ax = fixed if fixed is not None else ints(axes)
            return body(x, ax, a)

        return fn

    return factory


def _unsqueeze(x: Tensor | np.ndarray, axes: list[int], a: dict) -> Tensor | np.ndarray:
    rank = x.ndim + len(axes)
    for ax in sorted(i % rank for i in axes):
        x = np.expand_dims(x, ax) if isinstance(x, np.ndarray) else x.unsqueeze(ax)
    return x


def _squeeze(x: Tensor | np.ndarray, axes: list[int] | None, a: dict) -> Tensor | np.ndarray:
    dims = tuple(i % x.ndim for i in axes) if axes else None
    if isinstance(x, np.ndarray):
        return np.squeeze(x, axis=dims)
    return x.squeeze() if dims is None else x.squeeze(dims)


def _reduce(op: Callable) -> Callable[..., Tensor]:
    def body(x: Tensor, axes: list[int] | None, a: dict) -> Tensor:
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return op(x, dim=tuple(axes), keepdim=bool(a.get("keepdims", 1)))

    return body


def _softmax(fn: Callable) -> Callable:
    def factory(a: dict, opset: int, k: list) -> Fn:
        axis = a.get("axis", -1 if opset >= 13 else 1)
        if opset >= 13:
            return lambda m, x: fn(x, dim=axis)

        def coerced(m: Any, x: Tensor) -> Tensor:  # opset < 13: softmax over the 2-D coercion at axis
            ax = axis % x.dim()
            return fn(x.reshape(math.prod(x.shape[:ax]), -1), dim=-1).reshape(x.shape)

        return coerced

    return factory


def _div(m: Any, x: Tensor, y: Tensor) -> Tensor:
    if isinstance(x, np.ndarray):
        return x // y  # shape arithmetic: non-negative, so floor = ONNX's truncation
    return torch.div(x, y, rounding_mode="trunc") if not (x.is_floating_point() or y.is_floating_point()) else x / y


def _flatten(a: dict, opset: int, k: list) -> Fn:
    def fn(m: Any, x: Tensor) -> Tensor:
        ax = a.get("axis", 1) % (x.dim() + 1)
        return x.reshape(math.prod(x.shape[:ax]), math.prod(x.shape[ax:]))

    return fn


def _reshape(a: dict, opset: int, k: list) -> Fn:
    fixed = ints(k[1])
    allowzero = a.get("allowzero", 0)

    def fn(m: Any, x: Tensor, shape: Tensor) -> Tensor:
        s = fixed if fixed is not None else ints(shape)
        if not allowzero:  # ONNX: 0 copies the input's dimension
            s = [x.shape[i] if v == 0 else v for i, v in enumerate(s)]
        return x.reshape(s)

    return fn


def _gather(a: dict, opset: int, k: list) -> Fn:
    def fn(m: Any, x: Tensor, idx: Tensor) -> Tensor:
        ax = a.get("axis", 0) % x.ndim
        if isinstance(x, np.ndarray):
            return np.take(x, np.asarray(idx.tolist(), dtype=np.int64), axis=ax)
        idx = idx.to(x.device).long()
        idx = torch.where(idx < 0, idx + x.shape[ax], idx)
        out = x.index_select(ax, idx.reshape(-1))
        return out.reshape(x.shape[:ax] + idx.shape + x.shape[ax + 1 :])

    return fn


def _clip(a: dict, opset: int, k: list) -> Fn:
    if opset < 11:
        lo, hi = a.get("min"), a.get("max")
    else:
        lo, hi = [float(t) if t is not None else None for t in [*k, None, None][1:3]]

    def fn(m: Any, x: Tensor, lo_t: Tensor | None = None, hi_t: Tensor | None = None) -> Tensor:
        return torch.clamp(x, lo if lo is not None else lo_t, hi if hi is not None else hi_t)

    return fn


def _pad(a: dict, opset: int, k: list) -> Fn:
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[_str(a.get("mode", "constant"))]
    fixed = a.get("pads") if opset < 11 else ints(k[1])
    value = a.get("value", 0.0) if opset < 11 else (float(k[2]) if len(k) > 2 and k[2] is not None else None)
    axes = ints(k[3]) if len(k) > 3 else None

    def fn(
        m: Any, x: Tensor, pads: Tensor | None = None, cval: Tensor | None = None, ax: Tensor | None = None
    ) -> Tensor:
        p = fixed if fixed is not None else ints(pads)
        order = [i % x.dim() for i in (axes or ints(ax) or range(x.dim()))]
        begins, ends = [0] * x.dim(), [0] * x.dim()
        for j, i in enumerate(order):
            begins[i], ends[i] = p[j], p[j + len(order)]
        v = value if value is not None else (float(cval) if cval is not None else 0.0)
        padding = torch_pads(begins, ends)
        if not padding:
            return x
        return F.pad(x, padding, mode=mode, value=v if mode == "constant" else None)

    return fn


def _slice(a: dict, opset: int, k: list) -> Fn:
    if opset < 10:
        fixed = [a.get("starts"), a.get("ends"), a.get("axes"), None]
    else:
        fixed = [ints(t) for t in (k + [None] * 5)[1:5]]

    def fn(m: Any, x: Tensor, *dyn: Tensor | None) -> Tensor:
        given = [*dyn, None, None, None, None]
        starts, ends, axes, steps = [f if f is not None else ints(d) for f, d in zip(fixed, given)]
        axes = axes or list(range(len(starts)))
        steps = steps or [1] * len(starts)
        idx: list[slice] = [slice(None)] * x.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            if st > 0 or isinstance(x, np.ndarray):
                idx[ax % x.ndim] = slice(s, e, st)
            else:  # torch has no negative-step slicing; ONNX's clamping is Python's, so ask range()
                keep = list(range(x.shape[ax])[slice(s, e, st)])
                x = x.index_select(ax % x.dim(), torch.tensor(keep, dtype=torch.long, device=x.device))
        return x[tuple(idx)]

    return fn


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _pool(kind: str) -> Callable:
    def factory(a: dict, opset: int, k: list) -> Fn:
        kernel = list(a["kernel_shape"])
        d = len(kernel)
        strides, dil, begins, ends, auto = window(a, kernel)
        ceil = bool(a.get("ceil_mode", 0))
        include = bool(a.get("count_include_pad", 0))
        fill = -math.inf if kind == "max" else 0.0
        symmetric = begins == ends and all(p <= kk // 2 for p, kk in zip(begins, kernel))
        if kind == "avg" and (any(x != 1 for x in dil) or (not symmetric and not include) or auto.startswith("SAME")):
            raise InvalidInput(
                "AveragePool with dilations, SAME padding or uneven padding excluded from the count is not supported"
            )
        pool = getattr(F, f"{kind}_pool{d}d")
        extra = dict(dilation=dil) if kind == "max" else dict(count_include_pad=include)

        def fn(m: Any, x: Tensor) -> Tensor:
            pad = begins
            if auto.startswith("SAME"):
                x, pad = F.pad(x, same_pads(x, kernel, strides, dil, auto == "SAME_UPPER"), value=fill), [0] * d
            elif not symmetric:
                x, pad = F.pad(x, torch_pads(begins, ends), value=fill), [0] * d
            return pool(x, kernel, strides, pad, ceil_mode=ceil, **extra)

        return fn

    return factory


def _constant_of_shape(a: dict, opset: int, k: list) -> Fn:
    value = to_tensor(a["value"]) if "value" in a else torch.zeros(1)
    if value.is_floating_point():
        return lambda m, shape: value.reshape(()).expand(ints(shape)).clone()

    def fill(m: Any, shape: Tensor | np.ndarray) -> Tensor | np.ndarray:
        if isinstance(shape, Tensor):  # a constant shape (folded at conversion): one tensor, not Python objects
            return torch.full(ints(shape), value.item(), dtype=value.dtype)
        return np.full(ints(shape), value.item(), dtype=object)  # shape arithmetic (e.g. pads): on the host

    return fill


SIMPLE: dict[str, Callable[[dict, int, list], Fn]] = {
    "Relu": lambda a, o, k: lambda m, x: F.relu(x),
    "LeakyRelu": lambda a, o, k: lambda m, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Sigmoid": lambda a, o, k: lambda m, x: torch.sigmoid(x),
    "Tanh": lambda a, o, k: lambda m, x: torch.tanh(x),
    "Clip": _clip,
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "Identity": lambda a, o, k: lambda m, x: x,
    "Dropout": lambda a, o, k: lambda m, x, *rest: x,  # an ONNX graph is an inference graph
    "Add": lambda a, o, k: lambda m, x, y: x + y,
    "Sub": lambda a, o, k: lambda m, x, y: x - y,
    "Mul": lambda a, o, k: lambda m, x, y: x * y,
    "Div": lambda a, o, k: _div,
    "Concat": lambda a, o, k: (
        lambda m, *xs: (
            np.concatenate(xs, axis=a["axis"]) if isinstance(xs[0], np.ndarray) else torch.cat(xs, dim=a["axis"])
        )
    ),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda a, o, k: (
        lambda m, x: (
            np.transpose(x, a.get("perm"))
            if isinstance(x, np.ndarray)
            else x.permute(a.get("perm", list(range(x.dim()))[::-1]))
        )
    ),
    "Unsqueeze": _axes_op("axes", 13, _unsqueeze),
    "Squeeze": _axes_op("axes", 13, _squeeze),
    "Shape": lambda a, o, k: lambda m, x: host(list(x.shape[a.get("start", 0) : a.get("end")])),
    "Gather": _gather,
    "Cast": lambda a, o, k: lambda m, x: x if isinstance(x, np.ndarray) else x.to(_DTYPES[a["to"]]),
    "ConstantOfShape": _constant_of_shape,
    "Expand": lambda a, o, k: lambda m, x, s: x * torch.ones(ints(s), dtype=x.dtype, device=x.device),
    "Slice": _slice,
    "Pad": _pad,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda a, o, k: lambda m, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda a, o, k: lambda m, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "ReduceMean": _axes_op("axes", 18, _reduce(torch.mean)),
    "ReduceSum": _axes_op("axes", 13, _reduce(torch.sum)),
    "ReduceMax": _axes_op("axes", 18, _reduce(torch.amax)),
    **OPS,
}
# Ops that also run on host (shape) values, and the inputs of other ops that are read as shapes
HOST_OPS = {"Identity", "Cast", "Add", "Sub", "Mul", "Div", "Concat", "Gather", "Unsqueeze", "Squeeze", "Slice",
            "Reshape", "Transpose"} | HOST  # fmt: skip
SHAPE_ARGS = {"Reshape": {1}, "ConstantOfShape": {0}, "Expand": {1}, "Pad": {1, 3}, "Slice": {1, 2, 3, 4},
              "Unsqueeze": {1}, "Squeeze": {1}, "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1}}  # fmt: skip
LAYERS = {"Gemm", "MatMul", "Conv", "ConvTranspose", "BatchNormalization"}
SUPPORTED = frozenset(SIMPLE) | LAYERS | {"Constant"}


def check_supported(model: onnx.ModelProto) -> None:
    """Every op of the graph is one we convert, else ``InvalidInput`` listing all that are not."""
    bad = sorted(
        {n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node} - SUPPORTED
    )
    if bad:
        raise InvalidInput(
            f"unsupported ONNX op(s): {', '.join(bad)}",
            errors=[{"loc": ["model", op], "msg": "unsupported op", "type": "value_error"} for op in bad],
        )
