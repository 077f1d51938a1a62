"""ONNX → PyTorch: a small, safe converter written over the ``onnx`` package (no onnx2torch).

Why our own: the pruner needs real ``nn.Linear`` / ``nn.Conv*`` / ``nn.BatchNorm*`` modules (it
selects weights by module type, and safetensors state dicts are keyed by module path), and the
Fisher code runs the model under ``torch.func.functional_call`` + ``vmap(grad(...))``.

:func:`onnx_to_torch` gives an :class:`OnnxModule` (:mod:`core.io.onnx.module`). Weight-bearing nodes become
its layers; everything computable from constants alone (``Constant``, shape arithmetic on initializers,
``Transpose`` of a weight…) is folded once at conversion time, after the size of what it builds is known to be
within the limits (:mod:`core.io.onnx.bounds`); the other ops come from the table in
:mod:`core.io.onnx.ops`. What stays dynamic is shape bookkeeping (``Shape`` → ``Gather`` → ``Concat`` →
``Reshape``), which runs on host values rather than tensors, so that it is vmap-safe and can be traced again by
``torch.export``. Files are read by :mod:`core.io.onnx.safety`, which refuses any that reach outside themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import InvalidInput, out_of_memory_error
from core.io.limits import DEFAULT_LIMITS, LoadLimits, check_limit, elements
from core.io.onnx.bounds import floor_shape, fold_shape
from core.io.onnx.module import OnnxModule, Step, layer_key
from core.io.onnx.ops import LAYERS, SIMPLE, Fn, attrs, check_supported, host, same_pads, to_tensor, torch_pads, window
from core.io.onnx.safety import load_self_contained
from core.io.onnx.transformer_ops import CHECKS, MULTI_OUTPUT, range_count

_CONSTANTS_SETTING = "ARBORIST_MAX_CONSTANT_ELEMENTS"


class _Builder:
    """One conversion: the graph's nodes become layers and steps of an :class:`OnnxModule`."""

    def __init__(self, model: onnx.ModelProto, limits: LoadLimits):
        self.limits = limits
        self.folded = 0  # elements of the values folded so far
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        g = model.graph
        self.graph = g
        self.known: dict[str, Tensor] = {t.name: to_tensor(t) for t in g.initializer}
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
        self.steps: list[Step] = []
        self.skip: set[int] = set()
        self.inits = {t.name for t in g.initializer}
        self.node: onnx.NodeProto | None = None  # the node being converted
        self.sources: dict[str, list[str]] = {}  # initializer → the state-dict names copied from it unchanged

    def build(self) -> OnnxModule:
        for i, node in enumerate(self.graph.node):
            if i in self.skip:
                continue
            try:
                self.node = node
                self._node(i, node)
            except Exception as e:
                if out_of_memory_error(e) is None:
                    raise
                raise MemoryError(f"converting {node.op_type} node {node.name!r}: {e}") from e
        return self._finish()

    def _node(self, i: int, node: onnx.NodeProto) -> None:
        a = attrs(node)
        multi = node.op_type in MULTI_OUTPUT
        if not multi and any((o and self.consumers.get(o)) or o in self.graph_outputs for o in node.output[1:]):
            raise InvalidInput(f"{node.op_type} node {node.name!r}: only its first output is supported")
        if node.op_type in CHECKS:
            CHECKS[node.op_type](a, [self.rank.get(n) if n else None for n in node.input])
        outputs = tuple(node.output) if multi else tuple(node.output[:1])
        if node.op_type == "Constant":
            self.known[node.output[0]] = self._constant(a)
        elif node.op_type in LAYERS:
            getattr(self, f"_{node.op_type.lower()}")(i, node, a)
        else:
            k = [self.known.get(n) if n else None for n in node.input]
            fn = SIMPLE[node.op_type]({**a, "#outputs": len(outputs)}, self.opset, k)
            if node.op_type == "Range":
                fn = self._bounded_range(node, fn)
            if all(v is not None or not n for v, n in zip(k, node.input)):
                self._fold(node, fn, k)
            else:
                floor = floor_shape(node.op_type, a, self.opset, k)
                if floor is not None:
                    self._check_size(node, floor, "would build at least a")
                self._add(node.op_type, fn, node.input, outputs)

    def _bounded_range(self, node: onnx.NodeProto, fn: Fn) -> Fn:
        """``Range`` reads its length from values: checked against the limit before anything is built, when the
        graph is converted (constant operands) and on every run (operands computed from the input)."""

        limit, name = self.limits.max_constant_elements, node.name or node.op_type  # not the builder: it holds
        # every initializer, and the module keeps this closure

        def bounded(m: Any, *args: Any) -> Any:
            n = range_count(*args)
            check_limit(n or 0, limit, setting=_CONSTANTS_SETTING, what=f"Range node {node.name!r} would build a [{n}] "
                        "tensor of", loc=["model", "nodes", name])  # fmt: skip
            return fn(m, *args)

        return bounded

    def _fold(self, node: onnx.NodeProto, fn: Fn, k: list[Tensor | None]) -> None:
        """Computes a node whose inputs are all constants once, now, after bounding what it builds."""
        multi = node.op_type in MULTI_OUTPUT  # its outputs together are the size of its input
        shape = tuple(k[0].shape) if multi else fold_shape(node.op_type, fn, k)
        self._check_size(node, shape, "would build a")
        self.folded += elements(shape)
        check_limit(self.folded, self.limits.max_constant_elements, setting=_CONSTANTS_SETTING,
                    what=f"with {node.op_type} node {node.name!r}, the constants folded from the graph would hold",
                    loc=["model", "nodes", node.name or node.op_type])  # fmt: skip
        out = fn(None, *k)
        for name, value in zip(node.output, out) if multi else [(node.output[0], out)]:
            self.known[name] = torch.tensor(value.tolist()) if isinstance(value, np.ndarray) else value
            if node.input and node.input[0]:
                self.origin[name] = self.origin.get(node.input[0], node.input[0])

    def _check_size(self, node: onnx.NodeProto, shape: tuple[int, ...], verb: str) -> None:
        check_limit(elements(shape), self.limits.max_constant_elements, setting=_CONSTANTS_SETTING,
                    what=f"{node.op_type} node {node.name!r} {verb} {list(shape)} tensor of",
                    loc=["model", "nodes", node.name or node.op_type])  # fmt: skip

    def _finish(self) -> OnnxModule:
        inits = {t.name for t in self.graph.initializer}
        inputs = [v.name for v in self.graph.input if v.name not in inits]
        outputs = [o.name for o in self.graph.output]
        needed = {n for s in self.steps for n in s.inputs if n in self.known} | (set(outputs) & set(self.known))
        floats = {n: self.known[n] for n in needed if self.known[n].is_floating_point()}
        ints = {n: host(self.known[n]) for n in needed if not self.known[n].is_floating_point()}
        last: dict[str, int] = {}
        for i, s in enumerate(self.steps):
            for n in s.inputs:
                last[n] = i
        for i, s in enumerate(self.steps):
            s.free = tuple(sorted({n for n in s.inputs if n and last[n] == i and n not in outputs}))
        module = OnnxModule(self.layers, self.steps, inputs, outputs, floats, ints)
        module.source_names = self._source_names(module)
        module.input_types = {v.name: _dtype(v) for v in self.graph.input if v.name not in inits}
        return module

    def _add(self, op: str, fn: Fn, inputs: Any, outputs: Any) -> None:
        self.steps.append(Step(op, fn, tuple(inputs), tuple(outputs)))

    def _layer(self, name: str, module: nn.Module) -> str:
        key = layer_key(self.origin.get(name, name), self.layers)
        self.layers[key] = module
        self._note_sources(key, module)
        return key

    def _note_sources(self, key: str, module: nn.Module) -> None:
        """Which of the node's initializers each tensor of a new layer is an unchanged copy of, in order (Gemm's
        B, C → weight, bias; Conv's W, B; BatchNorm's scale, B, mean, var): the names the user's own module has.
        A transposed or scaled weight (MatMul, Gemm with transB = 0 or α ≠ 1) has no such name."""
        candidates = [n for n in self.node.input if n in self.inits] if self.node is not None else []
        used: set[str] = set()
        state = module.state_dict()
        for attr, t in state.items():
            for n in candidates:
                known = self.known[n]
                if n not in used and known.shape == t.shape and known.dtype == t.dtype and torch.equal(known, t):
                    used.add(n)
                    self.sources.setdefault(n, []).append(f"layers.{key}.{attr}")
                    break
        mean = next((n for n in used if self.sources[n][-1] == f"layers.{key}.running_mean"), None)
        if "num_batches_tracked" in state and mean and mean.endswith(".running_mean"):  # torch's BatchNorm has it
            tracked = mean.removesuffix("running_mean") + "num_batches_tracked"
            self.sources.setdefault(tracked, []).append(f"layers.{key}.num_batches_tracked")

    def _source_names(self, module: OnnxModule) -> dict[str, str]:
        """{state-dict name: the ONNX initializer's name} where that is one-to-one (a weight shared by two layers
        keeps the module's names) and clashes with no other state-dict name."""
        names = {dst[0]: src for src, dst in self.sources.items() if len(dst) == 1}
        own = set(module.state_dict())
        return {k: v for k, v in names.items() if k in own and (v == k or v not in own)}

    @staticmethod
    def _constant(a: dict) -> Tensor:
        if "value" in a:
            return to_tensor(a["value"])
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
        strides, dil, begins, ends, auto = window(a, kernel)
        sym = begins == ends and not auto.startswith("SAME")
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
        conv = nn.utils.skip_init(cls, w.shape[1] * groups, w.shape[0], kernel, strides, begins if sym else 0, dil,
                                  groups, bias=b is not None, dtype=w.dtype)  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
        key = self._layer(node.input[1], conv)
        pads = torch_pads(begins, ends)

        def run(m: Any, x: Tensor) -> Tensor:
            if auto.startswith("SAME"):
                x = F.pad(x, same_pads(x, kernel, strides, dil, auto == "SAME_UPPER"))
            elif not sym:
                x = F.pad(x, pads)
            return m.layers[key](x)

        self._add("Conv", run, node.input[:1], node.output[:1])

    def _convtranspose(self, i: int, node: onnx.NodeProto, a: dict) -> None:
        w = self.known.get(node.input[1])
        b = self.known.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        kernel = list(a.get("kernel_shape", w.shape[2:] if w is not None else []))
        strides, dil, begins, ends, auto = window(a, kernel)
        dynamic_bias = len(node.input) > 2 and node.input[2] and b is None
        if w is None or begins != ends or auto != "NOTSET" or "output_shape" in a or dynamic_bias:
            raise InvalidInput(
                f"ConvTranspose {node.name!r}: only constant weights, symmetric explicit pads, no output_shape"
            )
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


def _dtype(value: onnx.ValueInfoProto) -> torch.dtype | None:
    """The torch dtype of a graph input (``None`` when the graph does not say, or torch has no such dtype)."""
    elem = value.type.tensor_type.elem_type
    try:
        return torch.from_numpy(np.zeros(0, onnx.helper.tensor_dtype_to_np_dtype(elem))).dtype
    except (KeyError, TypeError, ValueError):
        return None


def onnx_to_torch(source: str | Path | onnx.ModelProto, limits: LoadLimits = DEFAULT_LIMITS) -> OnnxModule:
    """Convert an ONNX model (path or ModelProto) into an :class:`OnnxModule`.

    Order matters: external data / escaping names are refused (``UnsafeFormat``) before the
    checker runs, so nothing outside the upload is ever touched; then ``onnx.checker`` (a model it
    rejects is ``InvalidInput``), then every op is checked against what we can convert, so an
    unsupported graph fails with the full list of missing ops rather than on the first one.
    Whatever the graph would build from shapes is bounded by ``limits.max_constant_elements``
    (:mod:`core.io.onnx.bounds`) before it is allocated: ``LimitExceeded`` names the node and the size.
    """
    model = load_self_contained(source)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InvalidInput(f"invalid ONNX model: {e}") from e
    check_supported(model)
    try:
        model = onnx.shape_inference.infer_shapes(model)  # ranks for BatchNorm{1,2,3}d
    except Exception:  # noqa: BLE001 (inference is a hint only)
        pass
    return _Builder(model, limits).build()
