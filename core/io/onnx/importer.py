"""ONNX → PyTorch: a small, safe converter written over the ``onnx`` package (no onnx2torch).

Why our own: the pruner needs real ``nn.Linear`` / ``nn.Conv*`` / ``nn.BatchNorm*`` modules (it
selects weights by module type, and safetensors state dicts are keyed by module path), and the
Fisher code runs the model under ``torch.func.functional_call`` + ``vmap(grad(...))``.

The result, :class:`OnnxModule`, is a tiny interpreter: it replays the graph's nodes in their
(checker-enforced) topological order over a dict of named values. Weight-bearing nodes become
submodules of ``self.layers`` (an ``nn.ModuleDict`` keyed by sanitised initializer names), so
``functional_call`` can swap their parameters. Everything computable from constants alone
(``Constant``, shape arithmetic on initializers, ``Transpose`` of a weight…) is folded once at
conversion time. What stays dynamic is shape bookkeeping (``Shape`` → ``Gather`` → ``Concat`` →
``Reshape``), which runs on host values rather than tensors (see :class:`OnnxModule`), so that it
is vmap-safe and can be traced again by ``torch.export``.

Safety: ``onnx.load(..., load_external_data=False)`` and any tensor stored as external data, or
named like a path that escapes (``..``, absolute), is refused before anything else happens —
an upload must never make us open other files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper
from torch import Tensor, nn

from core.errors import InvalidInput, UnsafeFormat

Fn = Callable[..., Any]  # fn(module, *inputs) -> Tensor


# --------------------------------------------------------------------------- loading & safety


def _load(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    if not path.is_file():
        raise InvalidInput(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise InvalidInput(f"not a readable ONNX model: {e}") from e


def _escapes(name: str) -> bool:
    """A tensor name or external location that could address a file outside the model's folder."""
    return ".." in re.split(r"[\\/]", name) or name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:[\\/]", name))


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto a graph carries: initializers, sparse ones, node attributes, subgraphs."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield from (sp.values, sp.indices)
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield from (a.sparse_tensor.values, a.sparse_tensor.indices)
            for g in [a.g] if a.HasField("g") else []:
                yield from _tensors(g)
            for g in a.graphs:
                yield from _tensors(g)


def _refuse_unsafe(model: onnx.ModelProto) -> None:
    graphs = [model.graph] + [onnx.GraphProto(node=list(f.node)) for f in model.functions]
    for g in graphs:
        for t in _tensors(g):
            locations = [e.value for e in t.external_data if e.key == "location"]
            if any(_escapes(s) for s in [t.name, *locations]):
                raise UnsafeFormat(f"tensor {t.name!r} is named like a path outside the model (.. or absolute)")
            if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
                raise UnsafeFormat(
                    f"tensor {t.name!r} is stored as external data; upload a single self-contained .onnx file"
                )


# --------------------------------------------------------------------------- helpers


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _to_tensor(t: onnx.TensorProto) -> Tensor:
    return torch.from_numpy(numpy_helper.to_array(t).copy())


def _ints(v: Tensor | np.ndarray | list | None) -> list[int] | None:
    """A shape/axes operand as a list. Host values keep their elements as they are: under
    ``torch.export`` they are SymInts, and ``int()`` would specialise them."""
    if v is None:
        return None
    if isinstance(v, np.ndarray):
        return v.reshape(-1).tolist()
    return [int(i) for i in (v.tolist() if isinstance(v, Tensor) else v)]


def _host(v: Any) -> np.ndarray:
    """An integer value as a host (object) array: what shape arithmetic runs on."""
    return v if isinstance(v, np.ndarray) else np.asarray(v.tolist() if isinstance(v, Tensor) else v, dtype=object)


def _device(v: np.ndarray, like: Tensor | None) -> Tensor:
    """A host value used as tensor data (e.g. Gather indices) → a tensor beside ``like``."""
    return torch.tensor(v.tolist(), dtype=torch.int64 if v.size == 0 else None, device=like.device if like is not None else None)


def _key(name: str, taken: dict) -> str:
    """A ModuleDict key from an initializer name: ``blocks.0.conv1.weight`` → ``blocks_0_conv1``.

    A leading ``layers.`` is dropped so that exporting a converted model and importing it again
    gives back the same state-dict names (``layers.<key>.weight``).
    """
    name = re.sub(r"^layers\.", "", re.sub(r"[._]weight$", "", name))
    base = re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_") or "layer"
    if hasattr(nn.ModuleDict(), base):  # "keys", "training", … would clash with ModuleDict attributes
        base = f"l_{base}"
    key, i = base, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    return key


def _torch_pads(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX ``[b1, b2, …, e1, e2, …]`` (first axis first) → F.pad's (last axis first), trimmed."""
    out = [p for b, e in zip(reversed(begins), reversed(ends)) for p in (b, e)]
    while out and out[-2:] == [0, 0]:
        out = out[:-2]
    return out


def _same_pads(x: Tensor, kernel: list[int], strides: list[int], dil: list[int], upper: bool) -> list[int]:
    """Runtime ``auto_pad=SAME_*`` padding from the (logical, so vmap-safe) spatial size."""
    spatial = x.shape[2:]
    begins, ends = [], []
    for n, k, s, d in zip(spatial, kernel, strides, dil):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small = total // 2
        begins.append(small if upper else total - small)
        ends.append(total - small if upper else small)
    return _torch_pads(begins, ends)


def _window(a: dict, kernel: list[int]) -> tuple[list[int], list[int], list[int], list[int], str]:
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
# Each factory gets (attributes, opset, known) — ``known[i]`` is input i's value when it is a
# conversion-time constant, else None — and returns fn(module, *inputs). Constant operands such
# as shapes, axes and clip bounds are read once here rather than on every forward.


def _axes_op(attr_name: str, since: int, body: Callable[..., Tensor]) -> Callable:
    """Ops whose ``axes`` moved from an attribute to input 1 at opset ``since``."""

    def factory(a: dict, opset: int, k: list) -> Fn:
        fixed = a.get(attr_name) if opset < since else _ints(k[1] if len(k) > 1 else None)

        def fn(m: Any, x: Tensor, axes: Tensor | None = None) -> Tensor:
            ax = fixed if fixed is not None else _ints(axes)
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
    fixed = _ints(k[1])
    allowzero = a.get("allowzero", 0)

    def fn(m: Any, x: Tensor, shape: Tensor) -> Tensor:
        s = fixed if fixed is not None else _ints(shape)
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
        lo, hi = [float(t) if t is not None else None for t in (k + [None, None])[1:3]]

    def fn(m: Any, x: Tensor, lo_t: Tensor | None = None, hi_t: Tensor | None = None) -> Tensor:
        return torch.clamp(x, lo if lo is not None else lo_t, hi if hi is not None else hi_t)

    return fn


def _pad(a: dict, opset: int, k: list) -> Fn:
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[_str(a.get("mode", "constant"))]
    fixed = a.get("pads") if opset < 11 else _ints(k[1])
    value = a.get("value", 0.0) if opset < 11 else (float(k[2]) if len(k) > 2 and k[2] is not None else None)
    axes = _ints(k[3]) if len(k) > 3 else None

    def fn(m: Any, x: Tensor, pads: Tensor | None = None, cval: Tensor | None = None, ax: Tensor | None = None) -> Tensor:
        p = fixed if fixed is not None else _ints(pads)
        order = [i % x.dim() for i in (axes or _ints(ax) or range(x.dim()))]
        begins, ends = [0] * x.dim(), [0] * x.dim()
        for j, i in enumerate(order):
            begins[i], ends[i] = p[j], p[j + len(order)]
        v = value if value is not None else (float(cval) if cval is not None else 0.0)
        torch_pads = _torch_pads(begins, ends)
        if not torch_pads:
            return x
        return F.pad(x, torch_pads, mode=mode, value=v if mode == "constant" else None)

    return fn


def _slice(a: dict, opset: int, k: list) -> Fn:
    if opset < 10:
        fixed = [a.get("starts"), a.get("ends"), a.get("axes"), None]
    else:
        fixed = [_ints(t) for t in (k + [None] * 5)[1:5]]

    def fn(m: Any, x: Tensor, *dyn: Tensor | None) -> Tensor:
        starts, ends, axes, steps = [f if f is not None else _ints(d) for f, d in zip(fixed, [*dyn, None, None, None, None])]
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
        strides, dil, begins, ends, auto = _window(a, kernel)
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
                x, pad = F.pad(x, _same_pads(x, kernel, strides, dil, auto == "SAME_UPPER"), value=fill), [0] * d
            elif not symmetric:
                x, pad = F.pad(x, _torch_pads(begins, ends), value=fill), [0] * d
            return pool(x, kernel, strides, pad, ceil_mode=ceil, **extra)

        return fn

    return factory


def _constant_of_shape(a: dict, opset: int, k: list) -> Fn:
    value = _to_tensor(a["value"]) if "value" in a else torch.zeros(1)
    if not value.is_floating_point():  # integer fills feed shape arithmetic (e.g. pads): stay on the host
        return lambda m, shape: np.full(_ints(shape), value.item(), dtype=object)
    return lambda m, shape: value.reshape(()).expand(_ints(shape)).clone()


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
    "Concat": lambda a, o, k: lambda m, *xs: (
        np.concatenate(xs, axis=a["axis"]) if isinstance(xs[0], np.ndarray) else torch.cat(xs, dim=a["axis"])
    ),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda a, o, k: lambda m, x: (
        np.transpose(x, a.get("perm")) if isinstance(x, np.ndarray) else x.permute(a.get("perm", list(range(x.dim()))[::-1]))
    ),
    "Unsqueeze": _axes_op("axes", 13, _unsqueeze),
    "Squeeze": _axes_op("axes", 13, _squeeze),
    "Shape": lambda a, o, k: lambda m, x: _host(list(x.shape[a.get("start", 0) : a.get("end")])),
    "Gather": _gather,
    "Cast": lambda a, o, k: lambda m, x: x if isinstance(x, np.ndarray) else x.to(_DTYPES[a["to"]]),
    "ConstantOfShape": _constant_of_shape,
    "Expand": lambda a, o, k: lambda m, x, s: x * torch.ones(_ints(s), dtype=x.dtype, device=x.device),
    "Slice": _slice,
    "Pad": _pad,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda a, o, k: lambda m, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda a, o, k: lambda m, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "ReduceMean": _axes_op("axes", 18, _reduce(torch.mean)),
    "ReduceSum": _axes_op("axes", 13, _reduce(torch.sum)),
    "ReduceMax": _axes_op("axes", 18, _reduce(torch.amax)),
}
# Ops that also run on host (shape) values, and the inputs of other ops that are read as shapes
HOST_OPS = {"Identity", "Cast", "Add", "Sub", "Mul", "Div", "Concat", "Gather", "Unsqueeze", "Squeeze", "Slice",
            "Reshape", "Transpose"}  # fmt: skip
SHAPE_ARGS = {"Reshape": {1}, "ConstantOfShape": {0}, "Expand": {1}, "Pad": {1, 3}, "Slice": {1, 2, 3, 4},
              "Unsqueeze": {1}, "Squeeze": {1}, "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1}}  # fmt: skip
LAYERS = {"Gemm", "MatMul", "Conv", "ConvTranspose", "BatchNormalization"}
SUPPORTED = frozenset(SIMPLE) | LAYERS | {"Constant"}


# --------------------------------------------------------------------------- the module


@dataclass
class _Step:
    op: str
    fn: Fn
    inputs: tuple[str, ...]  # "" marks an omitted optional input
    outputs: tuple[str, ...]
    free: tuple[str, ...] = ()  # values dead after this step (keeps peak memory at one graph cut)

    def __call__(self, m: nn.Module, env: dict[str, Any]) -> Any:
        """Run on host values when the inputs are all integers and one is already a host value
        (shape arithmetic); otherwise on tensors, host values turned into tensors unless the op
        reads that input as a shape."""
        vals = [env[n] if n else None for n in self.inputs]
        if not any(isinstance(v, np.ndarray) for v in vals):
            return self.fn(m, *vals)
        tensors = [v for v in vals if isinstance(v, Tensor)]
        if self.op in HOST_OPS and not any(t.is_floating_point() for t in tensors):
            return np.asarray(self.fn(m, *[v if v is None else _host(v) for v in vals]), dtype=object)
        keep = SHAPE_ARGS.get(self.op, set())
        like = tensors[0] if tensors else None
        return self.fn(m, *[_device(v, like) if isinstance(v, np.ndarray) and i not in keep else v for i, v in enumerate(vals)])


class OnnxModule(nn.Module):
    """Runs a converted ONNX graph; ``layers`` holds its Linear/Conv/BatchNorm modules.

    Floating-point constants the graph still needs at run time are non-persistent buffers
    (``const_*``) so they follow ``.to(device)`` but stay out of the state dict. Integer values
    (shapes, axes, indices, and everything ``Shape`` computes) are *host values*: numpy object
    arrays of Python ints — or of SymInts while ``torch.export`` traces the module, which is what
    lets a converted model be exported again with a dynamic batch. Reading them costs no device
    sync, and under ``vmap`` ``x.shape`` is the per-example logical shape, so they are vmap-safe.
    """

    def __init__(self, layers: dict[str, nn.Module], steps: list[_Step], inputs: list[str], outputs: list[str],
                 floats: dict[str, Tensor], ints: dict[str, np.ndarray]):  # fmt: skip
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.steps, self.input_names, self.output_names = steps, inputs, outputs
        self._const_attrs: dict[str, str] = {}
        for name, t in floats.items():
            attr = "const_" + _key(name, {a: 1 for a in self._const_attrs.values()})
            self.register_buffer(attr, t, persistent=False)
            self._const_attrs[name] = attr
        self._ints = ints

    def forward(self, *args: Tensor) -> Tensor | tuple[Tensor, ...]:
        if len(args) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} input(s) {self.input_names}, got {len(args)}")
        env: dict[str, Any] = dict(self._ints)
        env.update({n: getattr(self, a) for n, a in self._const_attrs.items()})
        env.update(zip(self.input_names, args))
        for s in self.steps:
            env[s.outputs[0]] = s(self, env)
            for n in s.free:
                del env[n]
        outs = tuple(env[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs


# --------------------------------------------------------------------------- conversion


class _Builder:
    def __init__(self, model: onnx.ModelProto):
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        g = model.graph
        self.graph = g
        self.known: dict[str, Tensor] = {t.name: _to_tensor(t) for t in g.initializer}
        self.origin: dict[str, str] = {}  # folded value → the initializer it came from (for layer names)
        self.rank = {
            v.name: len(v.type.tensor_type.shape.dim)
            for v in [*g.value_info, *g.input, *g.output]
            if v.type.tensor_type.HasField("shape")
        }
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(g.node):
            for n in node.input:
                self.consumers.setdefault(n, []).append(i)
        self.graph_outputs = {o.name for o in g.output}
        self.layers: dict[str, nn.Module] = {}
        self.steps: list[_Step] = []
        self.skip: set[int] = set()

    def build(self) -> OnnxModule:
        for i, node in enumerate(self.graph.node):
            if i in self.skip:
                continue
            a = _attrs(node)
            if any(o and self.consumers.get(o) or o in self.graph_outputs for o in node.output[1:]):
                raise InvalidInput(f"{node.op_type} node {node.name!r}: only its first output is supported")
            if node.op_type == "Constant":
                self.known[node.output[0]] = self._constant(a)
            elif node.op_type in LAYERS:
                getattr(self, f"_{node.op_type.lower()}")(i, node, a)
            else:
                k = [self.known.get(n) if n else None for n in node.input]
                fn = SIMPLE[node.op_type](a, self.opset, k)
                if all(v is not None or not n for v, n in zip(k, node.input)):
                    out = fn(None, *k)  # fold at conversion time
                    self.known[node.output[0]] = torch.tensor(out.tolist()) if isinstance(out, np.ndarray) else out
                    if node.input and node.input[0]:
                        self.origin[node.output[0]] = self.origin.get(node.input[0], node.input[0])
                else:
                    self._add(node.op_type, fn, node.input, node.output[:1])
        return self._finish()

    def _finish(self) -> OnnxModule:
        inits = {t.name for t in self.graph.initializer}
        inputs = [v.name for v in self.graph.input if v.name not in inits]
        outputs = [o.name for o in self.graph.output]
        needed = {n for s in self.steps for n in s.inputs if n in self.known} | (set(outputs) & set(self.known))
        floats = {n: self.known[n] for n in needed if self.known[n].is_floating_point()}
        ints = {n: _host(self.known[n]) for n in needed if not self.known[n].is_floating_point()}
        last: dict[str, int] = {}
        for i, s in enumerate(self.steps):
            for n in s.inputs:
                last[n] = i
        for i, s in enumerate(self.steps):
            s.free = tuple(sorted({n for n in s.inputs if n and last[n] == i and n not in outputs}))
        return OnnxModule(self.layers, self.steps, inputs, outputs, floats, ints)

    def _add(self, op: str, fn: Fn, inputs: Any, outputs: Any) -> None:
        self.steps.append(_Step(op, fn, tuple(inputs), tuple(outputs)))

    def _layer(self, name: str, module: nn.Module) -> str:
        key = _key(self.origin.get(name, name), self.layers)
        self.layers[key] = module
        return key

    @staticmethod
    def _constant(a: dict) -> Tensor:
        if "value" in a:
            return _to_tensor(a["value"])
        for attr, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                            ("value_int", torch.int64), ("value_ints", torch.int64)):  # fmt: skip
            if attr in a:
                return torch.tensor(a[attr], dtype=dtype)
        raise InvalidInput(f"Constant with attribute(s) {sorted(a)} is not supported")

    @staticmethod
    def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
        lin = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin

    def _gemm(self, i: int, node: onnx.NodeProto, a: dict) -> None:
        """``Y = α·A'·B' + β·C``. With B an initializer this *is* ``nn.Linear``: Linear stores its
        weight as (out, in) and computes ``x @ W.T``, which is Gemm with ``transB=1`` — exactly what
        torch exports — so B is copied verbatim (transposed only when ``transB=0``), α is folded
        into the weight and a C that broadcasts as one row (β·C) becomes the bias."""
        alpha, beta, ta, tb = a.get("alpha", 1.0), a.get("beta", 1.0), a.get("transA", 0), a.get("transB", 0)
        ins = list(node.input) + [""] * (3 - len(node.input))
        b, c = self.known.get(ins[1]), self.known.get(ins[2]) if ins[2] else None
        if b is None or b.dim() != 2:
            def gemm(m: Any, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
                y = alpha * ((x.t() if ta else x) @ (w.t() if tb else w))
                return y if bias is None else y + beta * bias

            return self._add("Gemm", gemm, node.input, node.output[:1])
        w = (b if tb else b.t()).contiguous()
        if alpha != 1.0:
            w = w * alpha
        fold = c is not None and c.numel() in (1, w.shape[0]) and (c.dim() <= 1 or c.shape[-1] == c.numel())
        key = self._layer(ins[1], self._linear(w, (beta * c).reshape(-1).expand(w.shape[0]) if fold else None))

        def run(m: Any, x: Tensor, bias: Tensor | None = None) -> Tensor:
            y = m.layers[key](x.t() if ta else x)
            return y if bias is None else y + beta * bias

        self._add("Gemm", run, [ins[0]] + ([ins[2]] if ins[2] and not fold else []), node.output[:1])

    def _matmul(self, i: int, node: onnx.NodeProto, a: dict) -> None:
        """``X @ W`` with W an (in, out) initializer is ``nn.Linear`` with weight ``W.T``; a following
        ``Add`` of an (out,) initializer (how exporters write a biased Linear without Gemm) is folded
        in as the bias when the MatMul result feeds nothing else."""
        w = self.known.get(node.input[1])
        if w is None or w.dim() != 2:
            return self._add("MatMul", lambda m, x, y: torch.matmul(x, y), node.input, node.output[:1])
        out, bias = node.output[0], None
        users = self.consumers.get(out, [])
        if len(users) == 1 and out not in self.graph_outputs and self.graph.node[users[0]].op_type == "Add":
            add = self.graph.node[users[0]]
            other = self.known.get(add.input[1] if add.input[0] == out else add.input[0])
            if other is not None and other.numel() == w.shape[1] and other.shape[-1:] == (w.shape[1],):
                bias, out = other.reshape(-1), add.output[0]
                self.skip.add(users[0])
        key = self._layer(node.input[1], self._linear(w.t().contiguous(), bias))
        self._add("MatMul", lambda m, x: m.layers[key](x), node.input[:1], [out])

    def _conv(self, i: int, node: onnx.NodeProto, a: dict) -> None:
        """Conv → nn.Conv{1,2,3}d. Symmetric pads go into the module; asymmetric or ``SAME_*`` pads
        become an explicit ``F.pad`` before it (torch's ``padding`` is one number per side pair)."""
        w = self.known.get(node.input[1])
        b = self.known.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if w is None or (len(node.input) > 2 and node.input[2] and b is None):
            raise InvalidInput(f"Conv {node.name!r}: weights and bias must be initializers")
        kernel = list(a.get("kernel_shape", w.shape[2:]))
        d, groups = len(kernel), a.get("group", 1)
        strides, dil, begins, ends, auto = _window(a, kernel)
        sym = begins == ends and not auto.startswith("SAME")
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
        conv = nn.utils.skip_init(cls, w.shape[1] * groups, w.shape[0], kernel, strides, begins if sym else 0, dil,
                                  groups, bias=b is not None, dtype=w.dtype)  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
        key = self._layer(node.input[1], conv)
        pads = _torch_pads(begins, ends)

        def run(m: Any, x: Tensor) -> Tensor:
            if auto.startswith("SAME"):
                x = F.pad(x, _same_pads(x, kernel, strides, dil, auto == "SAME_UPPER"))
            elif not sym:
                x = F.pad(x, pads)
            return m.layers[key](x)

        self._add("Conv", run, node.input[:1], node.output[:1])

    def _convtranspose(self, i: int, node: onnx.NodeProto, a: dict) -> None:
        w = self.known.get(node.input[1])
        b = self.known.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        kernel = list(a.get("kernel_shape", w.shape[2:] if w is not None else []))
        strides, dil, begins, ends, auto = _window(a, kernel)
        dynamic_bias = len(node.input) > 2 and node.input[2] and b is None
        if w is None or begins != ends or auto != "NOTSET" or "output_shape" in a or dynamic_bias:
            raise InvalidInput(f"ConvTranspose {node.name!r}: only constant weights, symmetric explicit pads, no output_shape")
        groups, d = a.get("group", 1), len(kernel)
        cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[d]
        conv = nn.utils.skip_init(cls, w.shape[0], w.shape[1] * groups, kernel, strides, begins,
                                  list(a.get("output_padding", [0] * d)), groups, bias=b is not None, dilation=dil,
                                  dtype=w.dtype)  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
        key = self._layer(node.input[1], conv)
        self._add("ConvTranspose", lambda m, x: m.layers[key](x), node.input[:1], node.output[:1])

    def _batchnormalization(self, i: int, node: onnx.NodeProto, a: dict) -> None:
        """Inference BatchNormalization → nn.BatchNorm{1,2,3}d (chosen by the input's rank), called
        as a module so that eval mode uses the running statistics — ONNX's inference semantics —
        while a later fine-tuning in train mode updates them as usual. ONNX's momentum weighs the
        running value, torch's the new batch: torch momentum = 1 − ONNX momentum."""
        if a.get("training_mode", 0):
            raise InvalidInput(f"BatchNormalization {node.name!r} in training mode is not supported")
        scale, bias, mean, var = (self.known.get(n) for n in node.input[1:5])
        if any(t is None for t in (scale, bias, mean, var)):
            raise InvalidInput(f"BatchNormalization {node.name!r}: scale, bias, mean and var must be initializers")
        rank = self.rank.get(node.input[0], 4)
        cls = nn.BatchNorm1d if rank <= 3 else nn.BatchNorm2d if rank == 4 else nn.BatchNorm3d
        bn = cls(scale.numel(), eps=a.get("epsilon", 1e-5), momentum=1.0 - a.get("momentum", 0.9), dtype=scale.dtype)
        with torch.no_grad():
            for p, v in ((bn.weight, scale), (bn.bias, bias), (bn.running_mean, mean), (bn.running_var, var)):
                p.copy_(v)
        key = self._layer(node.input[1], bn)
        self._add("BatchNormalization", lambda m, x: m.layers[key](x), node.input[:1], node.output[:1])


def _check_ops(model: onnx.ModelProto) -> None:
    bad = sorted(
        {n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node}
        - SUPPORTED
    )
    if bad:
        raise InvalidInput(
            f"unsupported ONNX op(s): {', '.join(bad)}",
            errors=[{"loc": ["model", op], "msg": "unsupported op", "type": "value_error"} for op in bad],
        )


def onnx_to_torch(source: str | Path | onnx.ModelProto) -> OnnxModule:
    """Convert an ONNX model (path or ModelProto) into an :class:`OnnxModule`.

    Order matters: external data / escaping names are refused (``UnsafeFormat``) before the
    checker runs, so nothing outside the upload is ever touched; then ``onnx.checker`` (a model it
    rejects is ``InvalidInput``), then every op is checked against what we can convert, so an
    unsupported graph fails with the full list of missing ops rather than on the first one.
    """
    model = _load(source)
    _refuse_unsafe(model)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InvalidInput(f"invalid ONNX model: {e}") from e
    _check_ops(model)
    try:
        model = onnx.shape_inference.infer_shapes(model)  # ranks for BatchNorm{1,2,3}d
    except Exception:  # noqa: BLE001 — inference is a hint only
        pass
    return _Builder(model).build()


__all__ = ["OnnxModule", "SUPPORTED", "onnx_to_torch"]
