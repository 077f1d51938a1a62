"""The ops transformer exports add to the table of :mod:`core.io.onnx.ops`: logic and comparisons, ``Where``,
``Max``/``Min``, ``Range``, ``GatherElements``/``GatherND``, ``Split``, ``LayerNormalization``, ``Gelu``/``Erf``,
``Pow``, ``IsNaN`` (what ``torch.onnx.export`` of BERT, MiniLM and GPT-2 writes, dynamo and TorchScript, opset
20 and older).

Attention masks are built from shapes (``Shape`` → ``Range`` → ``Unsqueeze`` → ``GreaterOrEqual``/``And``), so
the ops that such chains use run on host values as well as on tensors (:data:`HOST`): they stay shape arithmetic,
vmap-safe and traceable by ``torch.export``. Attributes and ranks that the spec forbids are refused when the graph
is converted (:data:`CHECKS`, ``InvalidInput``), not when a job first runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import InvalidInput

Fn = Callable[..., Any]

__all__ = ["CHECKS", "HOST", "OPS", "range_count"]


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _ew(t: Callable, n: Callable) -> Callable[[dict, int, list], Fn]:
    """An element-wise op with ONNX (numpy) broadcasting: ``t`` on tensors, ``n`` on host values."""

    def fn(m: Any, *xs: Any) -> Any:
        return n(*xs) if all(isinstance(x, np.ndarray) for x in xs) else t(*_tensors(xs))

    return lambda a, o, k: fn


def _tensors(xs: tuple) -> list[Tensor]:
    """Host values among tensor operands → tensors beside them (a bool or int host value keeps its kind)."""
    like = next((x for x in xs if isinstance(x, Tensor)), None)
    device = like.device if like is not None else None
    return [torch.tensor(x.tolist(), device=device) if isinstance(x, np.ndarray) else x for x in xs]


def _variadic(t: Callable, n: Callable) -> Callable[[dict, int, list], Fn]:
    """``Max``/``Min``: one or more inputs, broadcast together (opset 8+); ``Max`` of one input is itself."""

    def fn(m: Any, *xs: Any) -> Any:
        if all(isinstance(x, np.ndarray) for x in xs):
            return reduce(n, xs)
        return reduce(t, _tensors(xs))

    return lambda a, o, k: fn


def _pow(m: Any, x: Any, y: Any) -> Any:
    """``Pow``: the result has the type of the base (opset 12+ allows an exponent of another type)."""
    if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
        return x**y
    x, y = _tensors((x, y))
    return torch.pow(x, y).to(x.dtype)


def _gelu(a: dict, opset: int, k: list) -> Fn:
    approximate = _str(a.get("approximate", "none"))
    if approximate not in ("none", "tanh"):
        raise InvalidInput(f"Gelu: approximate must be 'none' or 'tanh', not {approximate!r}")
    return lambda m, x: F.gelu(x, approximate=approximate)


def _layer_norm(a: dict, opset: int, k: list) -> Fn:
    """``LayerNormalization`` (opset 17): normalise over the axes ``axis``…last, population variance, ``epsilon``
    added inside the root; ``Scale`` and ``B`` broadcast over the normalised axes. ``stash_type`` 1 computes the
    statistics in float32 for a float16/bfloat16 input."""
    axis, eps = int(a.get("axis", -1)), float(a.get("epsilon", 1e-5))
    if int(a.get("stash_type", 1)) not in (1, 11, 16):  # float, double, bfloat16
        raise InvalidInput(f"LayerNormalization: unsupported stash_type {a.get('stash_type')}")

    def fn(m: Any, x: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
        ax = axis + x.dim() if axis < 0 else axis
        if not 0 <= ax < x.dim():
            raise InvalidInput(f"LayerNormalization: axis {axis} is out of range for a rank-{x.dim()} input")
        shape = tuple(x.shape[ax:])
        if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
            return F.layer_norm(x, shape, scale, bias, eps)
        dims = tuple(range(ax, x.dim()))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean = xf.mean(dim=dims, keepdim=True)
        var = (xf - mean).square().mean(dim=dims, keepdim=True)
        y = ((xf - mean) * torch.rsqrt(var + eps)).to(x.dtype) * scale
        return y if bias is None else y + bias

    return fn


def range_count(start: Any, limit: Any, delta: Any) -> int | None:
    """``Range``'s length: ``max(ceil((limit - start) / delta), 0)``, exact for integers; ``None`` for symbolic
    operands (while ``torch.export`` traces: the length is the traced input's, known to be real)."""
    start, limit, delta = (v.reshape(-1)[0] if isinstance(v, np.ndarray) else v for v in (start, limit, delta))
    start, limit, delta = (v.item() if isinstance(v, Tensor) else v for v in (start, limit, delta))
    if any(isinstance(v, (torch.SymInt, torch.SymFloat)) for v in (start, limit, delta)):
        return None
    if delta == 0:
        raise InvalidInput("Range: delta must not be 0")
    if all(isinstance(v, (int, np.integer)) for v in (start, limit, delta)):
        return max(-((start - limit) // delta), 0)
    return max(math.ceil((limit - start) / delta), 0)


def _range(a: dict, opset: int, k: list) -> Fn:
    """``Range(start, limit, delta)`` on scalars: ``start + i·delta`` for i < :func:`range_count`, a tensor of the
    operands' type (beside the module's weights when the operands are host values: the positions and mask axes
    that exports build from ``Shape``; ``torch.arange`` takes them symbolic, so a traced batch stays dynamic).
    Its length is bounded by :mod:`core.io.onnx.build` before it is built."""

    def fn(m: Any, start: Any, limit: Any, delta: Any) -> Tensor:
        if all(isinstance(v, np.ndarray) for v in (start, limit, delta)):
            device = next((t.device for t in (*m.buffers(), *m.parameters())), None) if m is not None else None
            s, e, d = (v.reshape(-1)[0] for v in (start, limit, delta))
            return torch.arange(s, e, d, dtype=torch.int64, device=device)
        like = next(v for v in (start, limit, delta) if isinstance(v, Tensor))
        n = range_count(start, limit, delta)
        s, d = (v.reshape(-1)[0].item() if isinstance(v, (Tensor, np.ndarray)) else v for v in (start, delta))
        steps = torch.arange(n, device=like.device, dtype=torch.float64 if like.is_floating_point() else torch.int64)
        return (s + d * steps).to(like.dtype)

    return fn


def _gather_elements(a: dict, opset: int, k: list) -> Fn:
    """``GatherElements``: ``torch.gather`` along ``axis`` (default 0), negative indices counted from the end."""
    axis = int(a.get("axis", 0))

    def fn(m: Any, x: Any, idx: Any) -> Tensor:
        x, idx = _tensors((x, idx))
        if idx.dim() != x.dim():
            raise InvalidInput(f"GatherElements: indices of rank {idx.dim()} for data of rank {x.dim()}")
        ax = axis % x.dim()
        idx = idx.long()
        return torch.gather(x, ax, torch.where(idx < 0, idx + x.shape[ax], idx))

    return fn


def _gather_nd(a: dict, opset: int, k: list) -> Fn:
    """``GatherND`` with ``batch_dims`` b: the last axis of ``indices`` (length q) indexes ``data``'s axes b…b+q-1,
    the leading b axes of both are walked together. Output shape: ``indices.shape[:-1] + data.shape[b+q:]``."""
    b = int(a.get("batch_dims", 0))

    def fn(m: Any, x: Any, idx: Any) -> Tensor:
        x, idx = _tensors((x, idx))
        idx = idx.long()
        q = idx.shape[-1] if idx.dim() else 0
        if idx.dim() < 1 or b >= min(x.dim(), idx.dim()) or b + q > x.dim():
            raise InvalidInput(f"GatherND: indices {list(idx.shape)} with batch_dims {b} do not fit data of rank "
                               f"{x.dim()}")  # fmt: skip
        lead = tuple(idx.shape[b:-1])
        flat_x = x.reshape(math.prod(x.shape[:b]), *x.shape[b:])
        flat_i = idx.reshape(math.prod(idx.shape[:b]), *lead, q)
        dims = torch.tensor(x.shape[b : b + q], device=idx.device)
        flat_i = torch.where(flat_i < 0, flat_i + dims, flat_i)
        batch = torch.arange(flat_x.shape[0], device=x.device).reshape(-1, *[1] * len(lead))
        out = flat_x[(batch, *flat_i.unbind(-1))]
        return out.reshape(*x.shape[:b], *lead, *x.shape[b + q :])

    return fn


def _split(a: dict, opset: int, k: list) -> Fn:
    """``Split`` into ``a['#outputs']`` parts: sizes from the ``split`` attribute (opset < 13) or input, else
    ``num_outputs`` (opset 18: parts of ceil(n / num_outputs), the last smaller), else equal parts."""
    axis, count = int(a.get("axis", 0)), int(a["#outputs"])
    fixed = a.get("split") if opset < 13 else (k[1].tolist() if len(k) > 1 and k[1] is not None else None)
    num = a.get("num_outputs")
    if num is not None and int(num) != count:
        raise InvalidInput(f"Split: num_outputs {num} but the node has {count} outputs")
    if fixed is not None and len(fixed) != count:
        raise InvalidInput(f"Split: {len(fixed)} sizes for {count} outputs")

    def fn(m: Any, x: Tensor, split: Any = None) -> tuple[Tensor, ...]:
        sizes = fixed if fixed is not None else (None if split is None else [int(s) for s in split.tolist()])
        n = x.shape[axis]
        if sizes is None:
            part = -(-n // count) if num is not None else n // count
            if num is None and part * count != n:
                raise InvalidInput(f"Split: axis of size {n} cannot be split into {count} equal parts")
            sizes = [part] * (count - 1) + [n - part * (count - 1)]
        if len(sizes) != count or sum(sizes) != n or min(sizes) < 0:
            raise InvalidInput(f"Split: sizes {sizes} do not split an axis of size {n} into {count} outputs")
        return torch.split(x, sizes, dim=axis)

    return fn


def _where(m: Any, c: Any, x: Any, y: Any) -> Any:
    if all(isinstance(v, np.ndarray) for v in (c, x, y)):
        return np.where(c.astype(bool), x, y)
    c, x, y = _tensors((c, x, y))
    return torch.where(c.bool(), x, y)


OPS: dict[str, Callable[[dict, int, list], Fn]] = {
    "Erf": lambda a, o, k: lambda m, x: torch.erf(x),
    "Gelu": _gelu,
    "Pow": lambda a, o, k: _pow,
    "IsNaN": lambda a, o, k: lambda m, x: torch.isnan(x),
    "LayerNormalization": _layer_norm,
    "Not": _ew(torch.logical_not, np.logical_not),
    "And": _ew(torch.logical_and, np.logical_and),
    "Or": _ew(torch.logical_or, np.logical_or),
    "Equal": _ew(torch.eq, np.equal),
    "Greater": _ew(torch.gt, np.greater),
    "GreaterOrEqual": _ew(torch.ge, np.greater_equal),
    "Less": _ew(torch.lt, np.less),
    "LessOrEqual": _ew(torch.le, np.less_equal),
    "Where": lambda a, o, k: _where,
    "Max": _variadic(torch.maximum, np.maximum),
    "Min": _variadic(torch.minimum, np.minimum),
    "Range": _range,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "Split": _split,
}
#: the ops of :data:`OPS` that also run on host values (shape and mask arithmetic)
HOST = {"Not", "And", "Or", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Where", "Max", "Min",
        "Range", "Pow"}  # fmt: skip
#: ops with more than one output that may all be used
MULTI_OUTPUT = {"Split"}


def _axis_in(op: str, axis: int, rank: int | None) -> None:
    if rank is not None and not -rank <= axis < rank:
        raise InvalidInput(f"{op}: axis {axis} is out of range for an input of rank {rank}")


def _check_layer_norm(a: dict, ranks: list[int | None]) -> None:
    _axis_in("LayerNormalization", int(a.get("axis", -1)), ranks[0])


def _check_gather_elements(a: dict, ranks: list[int | None]) -> None:
    _axis_in("GatherElements", int(a.get("axis", 0)), ranks[0])
    if None not in ranks[:2] and ranks[0] != ranks[1]:
        raise InvalidInput(f"GatherElements: indices of rank {ranks[1]} for data of rank {ranks[0]}")


def _check_gather_nd(a: dict, ranks: list[int | None]) -> None:
    b = int(a.get("batch_dims", 0))
    if b < 0 or any(r is not None and b >= r for r in ranks[:2]):
        raise InvalidInput(f"GatherND: batch_dims {b} must be below the ranks of data and indices {ranks[:2]}")


def _check_range(a: dict, ranks: list[int | None]) -> None:
    if any(r not in (None, 0) for r in ranks):
        raise InvalidInput(f"Range: start, limit and delta must be scalars, their ranks are {ranks}")


def _check_split(a: dict, ranks: list[int | None]) -> None:
    _axis_in("Split", int(a.get("axis", 0)), ranks[0])


#: static checks against the input ranks shape inference found (None where it found none)
CHECKS: dict[str, Callable[[dict, list[int | None]], None]] = {
    "LayerNormalization": _check_layer_norm,
    "GatherElements": _check_gather_elements,
    "GatherND": _check_gather_nd,
    "Range": _check_range,
    "Split": _check_split,
}
