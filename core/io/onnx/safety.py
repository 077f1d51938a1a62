"""Reading an uploaded ONNX file without letting it reach any other file.

``onnx.load(..., load_external_data=False)``, and any tensor stored as external data, or named like a path
that escapes (``..``, absolute), is refused before anything else happens — an upload must never make us open
other files.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from core.errors import InvalidInput, UnsafeFormat


def load_self_contained(source: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """The model in ``source`` (a path, or a ModelProto as it is), refused unless it is self-contained:
    ``UnsafeFormat`` for external data or a tensor named like a path outside the model."""
    model = _load(source)
    _refuse_unsafe(model)
    return model


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
