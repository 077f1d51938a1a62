"""An imported ONNX graph of several named inputs (``input_ids``, ``attention_mask``, …) run on ONE float tensor.

The engine, the run and the checkpoints feed a model one float32 tensor ``(N, D)``. :class:`PackedOnnxModule`
takes that tensor as the concatenation of its named inputs, each flattened per example (:func:`pack`), and hands
the graph each input in its own shape and dtype: integer inputs (token ids, masks) are rounded back to their
integer dtype, exact below 2**24. Called with the inputs themselves (as the ONNX export does), it runs them as is.

Its parameters, buffers and state-dict names are those of the :class:`OnnxModule` it is built from, so the masks
and ``pruned.safetensors`` keep the upload's names, and the pruned model is exported with the upload's inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import InvalidInput
from core.io.onnx.module import OnnxModule

__all__ = ["InputSlot", "PackedOnnxModule", "pack"]

_EXACT = 2**24  # integers a float32 holds exactly


@dataclass(frozen=True)
class InputSlot:
    """One named input: its per-example shape and the dtype the graph takes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def pack(slots: list[InputSlot], arrays: dict[str, Tensor]) -> Tensor:
    """The float32 ``(N, sum of slot sizes)`` a :class:`PackedOnnxModule` of ``slots`` unpacks into ``arrays``."""
    cols = []
    for s in slots:
        a = arrays[s.name]
        if tuple(a.shape[1:]) != s.shape:
            raise InvalidInput(f"input {s.name!r} is shaped {tuple(a.shape[1:])} per example, expected {s.shape}")
        if not s.dtype.is_floating_point and a.numel() and int(a.abs().max()) >= _EXACT:
            raise InvalidInput(f"input {s.name!r} holds integers of 2**24 or more, which float32 cannot carry exactly")
        cols.append(a.reshape(len(a), -1).to(torch.float32))
    return torch.cat(cols, 1)


class PackedOnnxModule(OnnxModule):
    """See the module docstring; ``distill``: the job's objective is distillation (adds the cosine metric)."""

    @classmethod
    def from_module(cls, m: OnnxModule, slots: list[InputSlot], *, distill: bool = False) -> PackedOnnxModule:
        if sorted(s.name for s in slots) != sorted(m.input_names):
            raise ValueError(f"slots {[s.name for s in slots]} are not the graph's inputs {m.input_names}")
        floats = {name: getattr(m, attr) for name, attr in m._const_attrs.items()}
        out = cls(dict(m.layers.items()), m.steps, m.input_names, m.output_names, floats, m._ints)
        out.source_names, out.input_types = dict(m.source_names), dict(m.input_types)
        out.slots, out.distill = list(slots), distill
        return out.train(m.training)

    def unpack(self, x: Tensor) -> tuple[Tensor, ...]:
        """The named inputs in ``x`` (packed in the slots' order, see :func:`pack`), in the graph's order, shapes and
        dtypes."""
        out, at = {}, 0
        for s in self.slots:
            part = x[:, at : at + s.size].reshape(x.shape[0], *s.shape)
            out[s.name] = part.to(s.dtype) if s.dtype.is_floating_point else part.round().to(s.dtype)
            at += s.size
        return tuple(out[n] for n in self.input_names)

    def forward(self, *args: Tensor) -> Tensor | tuple[Tensor, ...]:
        total = sum(s.size for s in self.slots)
        x = args[0] if len(args) == 1 else None
        if x is not None and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == total:
            args = self.unpack(x)
        return super().forward(*args)

    # metrics beyond the loss, read by core.runs.train.evaluate
    def metric_sums(self, out: Tensor, y: Tensor) -> dict[str, float]:
        if not self.distill:
            return {}
        return {"cosine": float(F.cosine_similarity(out.double().flatten(1), y.double().flatten(1), dim=-1).sum())}
