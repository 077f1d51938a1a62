"""The sizes an ONNX graph would materialise, known before anything is allocated.

A few bytes of graph can ask for gigabytes: ``ConstantOfShape [60000, 60000]``, an ``Expand`` or a broadcasting
``Add`` of two small constants, a ``Pad`` of a million, a ``Concat`` chain that doubles a constant at every step.
The importer folds what is computable from constants at conversion time (:mod:`core.io.onnx.build`), so each
folded node's output shape is worked out first, by running the same op on the ``meta`` device (shapes only, no
data: every op of :data:`~core.io.onnx.ops.SIMPLE` gets this for free, whatever ops are added later); the inputs
an op reads as values (shapes, axes, pads) stay real. A node that is not folded but builds a tensor from a
constant shape (``Expand`` to it, ``Pad`` by it) gets a lower bound on its output instead, assuming every unknown
dimension is 1; ``Range`` is bounded by the length its operands give, at conversion and at run time. Ops that
would build tensors from shapes we cannot bound (``Tile``, ``Resize``,
``RandomNormal``…) are not converted at all (:func:`~core.io.onnx.ops.check_supported`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from core.io.onnx.ops import SHAPE_ARGS, Fn, ints
from core.io.onnx.transformer_ops import range_count

__all__ = ["floor_shape", "fold_shape"]


def fold_shape(op: str, fn: Fn, known: list[Tensor | None]) -> tuple[int, ...]:
    """The output shape of ``fn`` (a :data:`~core.io.onnx.ops.SIMPLE` op) over constant inputs ``known``, computed
    without allocating the output."""
    if op == "ConstantOfShape":  # the fill value is an attribute: the output is built from the shape alone
        return tuple(ints(known[0]) or ())
    if op == "Range":  # the length comes from the operands' values
        return (range_count(*known),)
    keep = SHAPE_ARGS.get(op, set())
    args = [v if v is None or i in keep else v.to("meta") for i, v in enumerate(known)]
    out = fn(None, *args)
    return tuple(int(d) for d in (out.shape if isinstance(out, Tensor) else np.shape(out)))


def floor_shape(op: str, a: dict[str, Any], opset: int, known: list[Tensor | None]) -> tuple[int, ...] | None:
    """For a node that is not folded: the smallest output its constant shape operand allows (each dimension the
    data input might have taken as 1), or ``None`` when no operand fixes a size."""
    if op == "Expand" and len(known) > 1 and known[1] is not None:
        return tuple(ints(known[1]) or ())
    if op == "Pad":
        pads = a.get("pads") if opset < 11 else ints(known[1]) if len(known) > 1 else None
        if pads:
            n = len(pads) // 2
            return tuple(max(1, 1 + int(b) + int(e)) for b, e in zip(pads[:n], pads[n:]))
    return None
