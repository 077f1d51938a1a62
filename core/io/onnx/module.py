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

from core.io.onnx.ops import HOST_OPS, SHAPE_ARGS, Fn, host, to_device


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
        """Run on host values when the inputs are all integers and one is already a host value
        (shape arithmetic); otherwise on tensors, host values turned into tensors unless the op
        reads that input as a shape."""
        vals = [env[n] if n else None for n in self.inputs]
        if not any(isinstance(v, np.ndarray) for v in vals):
            return self.fn(m, *vals)
        tensors = [v for v in vals if isinstance(v, Tensor)]
        if self.op in HOST_OPS and not any(t.is_floating_point() for t in tensors):
            return np.asarray(self.fn(m, *[v if v is None else host(v) for v in vals]), dtype=object)
        keep = SHAPE_ARGS.get(self.op, set())
        like = tensors[0] if tensors else None
        args = [to_device(v, like) if isinstance(v, np.ndarray) and i not in keep else v for i, v in enumerate(vals)]
        return self.fn(m, *args)


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
