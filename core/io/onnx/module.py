"""The module an imported ONNX graph becomes: :class:`OnnxModule`, a tiny interpreter of its :class:`Step` list.

It replays the graph's nodes in their (checker-enforced) topological order over a dict of named values.
Weight-bearing nodes are submodules of ``self.layers`` (an ``nn.ModuleDict`` keyed by :func:`layer_key`), so
``functional_call`` can swap their parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from core.errors import ArboristError, InvalidInput, out_of_memory_error
from core.io.onnx.ops import HOST_OPS, SHAPE_ARGS, Fn
from core.io.onnx.values import to_device


def layer_key(name: str, taken: dict) -> str:
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


@dataclass
class Step:
    """One node of the graph as it runs: ``fn(module, *inputs)`` stored under its first output's name."""

    op: str
    fn: Fn
    inputs: tuple[str, ...]  # "" marks an omitted optional input
    outputs: tuple[str, ...]
    free: tuple[str, ...] = ()  # values dead after this step (keeps peak memory at one graph cut)

    def __call__(self, m: nn.Module, env: dict[str, Any]) -> Any:
        """Run on host values when every input is one (shape arithmetic); otherwise on tensors, host
        values turned into tensors (on the device of the other inputs, else of the module) unless the
        op reads that input as a shape. Integer tensors (token ids, masks) stay tensors: they are data."""
        vals = [env[n] if n else None for n in self.inputs]
        if not any(isinstance(v, np.ndarray) for v in vals):
            return self.fn(m, *vals)
        tensors = [v for v in vals if isinstance(v, Tensor)]
        if self.op in HOST_OPS and not tensors:
            out = self.fn(m, *vals)
            return np.asarray(out, dtype=object) if not isinstance(out, Tensor) else out
        keep = SHAPE_ARGS.get(self.op, set())
        like = tensors[0] if tensors else next(m.buffers(), next(m.parameters(), None))
        args = [to_device(v, like) if isinstance(v, np.ndarray) and i not in keep else v for i, v in enumerate(vals)]
        return self.fn(m, *args)


def _run(s: Step, m: nn.Module, env: dict[str, Any]) -> Any:
    """One step; a graph that cannot run on this input (ranks, broadcasting, indices out of range: things only
    the data shows) is the user's problem, ``InvalidInput`` naming the node, not a server fault."""
    try:
        return s(m, env)
    except ArboristError:
        raise
    except (RuntimeError, IndexError, ValueError, TypeError) as e:
        if out_of_memory_error(e) is not None:
            raise
        raise InvalidInput(f"the ONNX graph fails at its {s.op} node (output {s.outputs[0]!r}): {e}") from e


class OnnxModule(nn.Module):
    """Runs a converted ONNX graph; ``layers`` holds its Linear/Conv/BatchNorm modules.

    Floating-point constants the graph still needs at run time are non-persistent buffers
    (``const_*``) so they follow ``.to(device)`` but stay out of the state dict. Integer values
    (shapes, axes, indices, and everything ``Shape`` computes) are *host values*: numpy object
    arrays of Python ints — or of SymInts while ``torch.export`` traces the module, which is what
    lets a converted model be exported again with a dynamic batch. Reading them costs no device
    sync, and under ``vmap`` ``x.shape`` is the per-example logical shape, so they are vmap-safe.
    """

    def __init__(self, layers: dict[str, nn.Module], steps: list[Step], inputs: list[str], outputs: list[str],
                 floats: dict[str, Tensor], ints: dict[str, np.ndarray]):  # fmt: skip
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.steps, self.input_names, self.output_names = steps, inputs, outputs
        self._const_attrs: dict[str, str] = {}
        for name, t in floats.items():
            attr = "const_" + layer_key(name, {a: 1 for a in self._const_attrs.values()})
            self.register_buffer(attr, t, persistent=False)
            self._const_attrs[name] = attr
        self._ints = ints
        #: {state-dict name: the ONNX initializer it was copied from}: the names of the user's own module, which
        #: the pruned weights and masks are saved under (set by :func:`core.io.onnx.build.onnx_to_torch`)
        self.source_names: dict[str, str] = {}
        #: {graph input: its torch dtype, None when the graph does not say} (set by ``onnx_to_torch``)
        self.input_types: dict[str, Any] = {}

    def forward(self, *args: Tensor) -> Tensor | tuple[Tensor, ...]:
        if len(args) != len(self.input_names):  # e.g. (input_ids, attention_mask) fed one tensor of features
            raise InvalidInput(f"the ONNX model takes {len(self.input_names)} input(s) {self.input_names}, "
                               f"it was given {len(args)}")  # fmt: skip
        env: dict[str, Any] = dict(self._ints)
        env.update({n: getattr(self, a) for n, a in self._const_attrs.items()})
        env.update(zip(self.input_names, args))
        for s in self.steps:
            out = _run(s, self, env)
            if len(s.outputs) == 1:
                env[s.outputs[0]] = out
            else:  # an op whose outputs are all used (Split)
                env.update((n, v) for n, v in zip(s.outputs, out) if n)
            for n in s.free:
                del env[n]
        outs = tuple(env[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs
