"""The pruned weights in compressed-tensors' sparse formats: ``compressed.safetensors``.

compressed-tensors 0.20 (the pinned version: transformers 5 needs ≥ 0.15) still names the formats
(``CompressionFormat.sparse_bitmask``, ``sparse_24_bitmask``) but no longer ships their compressors, and the last
releases that do (≤ 0.14) refuse transformers 5. This module writes both formats byte for byte as those compressors
did (0.13 ``compressors/sparse_compressors/sparse_bitmask.py`` and ``sparse_24_bitmask.py``) and reads them back;
the bit packing is the library's own ``compressed_tensors.utils.pack_bitmasks`` convention (numpy ``packbits`` along
the last axis, little bit order), so its ``unpack_bitmasks`` reads our masks.

For a weight ``<prefix>.weight`` the file holds, instead of the dense tensor:

* ``sparse-bitmask`` (unstructured, block): ``<prefix>.shape`` (int64, the dense shape), ``<prefix>.compressed``
  (the non-zero values, 1-D, row-major order), ``<prefix>.bitmask`` (uint8, the non-zero map packed 8 per byte along
  the last axis), ``<prefix>.row_offsets`` (int64: where each row's values start in ``compressed``);
* ``sparse-24-bitmask`` (2:4 on 2-D weights whose column count is a multiple of 4): ``<prefix>.shape`` (int64,
  shape (2, 1)), ``<prefix>.compressed`` (rows × columns/2: the two kept values of every group of four),
  ``<prefix>.bitmask`` (as above).

A weight of more than two dimensions (a Conv kernel) is stored as its (out, in·kh·kw) matrix, the view the engine
prunes it in (:func:`core.engine.patterns.as_matrix`) and the one compressed-tensors' formats are made for: kept as
4-D, the library's per-row offsets (int64 per kernel row of 3) would make a 90 % sparse ResNet 0.85× its dense size.
A reader of the library's format gets that matrix; :func:`read_compressed` restores the shape from the metadata.

Every other tensor (biases, dense layers, weights the format cannot hold) is stored as it is, under its own name.
The file's metadata records ``format`` (``pt``), ``sparsity_format``, the compressed weight names and ``shapes``
(the dense shape of each weight stored as a matrix).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from torch import Tensor

from core.io.files import atomic_write
from core.io.model_files import own_storage

__all__ = [
    "BITMASK",
    "SPARSE_24",
    "compress_state",
    "decompress_state",
    "pack_bits",
    "read_compressed",
    "unpack_bits",
    "write_compressed",
]

BITMASK = "sparse-bitmask"
SPARSE_24 = "sparse-24-bitmask"
_KEYS = {BITMASK: ("shape", "compressed", "bitmask", "row_offsets"), SPARSE_24: ("shape", "compressed", "bitmask")}


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor packed 8 per byte along its last axis (little bit order): shape (…, ⌈C/8⌉), uint8."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy().astype(bool), axis=-1, bitorder="little"))


def unpack_bits(packed: Tensor, shape: list[int]) -> Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_bits` packed."""
    bits = np.unpackbits(packed.cpu().numpy(), axis=-1, count=shape[-1], bitorder="little")
    return torch.from_numpy(bits.reshape(shape).astype(bool))


def _bitmask(t: Tensor) -> dict[str, Tensor]:
    keep = t != 0
    row_counts = keep.sum(dim=-1)
    return {
        "shape": torch.tensor(list(t.shape)),
        "compressed": t[keep].contiguous(),
        "bitmask": pack_bits(keep),
        "row_offsets": torch.cumsum(row_counts, 0) - row_counts,
    }


def _fits_24(t: Tensor) -> bool:
    """A 2-D weight whose every group of 4 consecutive weights of a row has at most 2 non-zeros."""
    if t.dim() != 2 or t.shape[1] % 4:
        return False
    return bool(((t != 0).reshape(-1, 4).sum(dim=1) <= 2).all())


def _sparse24(t: Tensor) -> dict[str, Tensor]:
    rows, cols = t.shape
    groups = t.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)  # the library's choice: the two largest of four
    keep = keep.reshape(rows, cols)
    return {
        "shape": torch.tensor([rows, cols]).reshape(-1, 1),
        "compressed": t[keep].reshape(rows, cols // 2).contiguous(),
        "bitmask": pack_bits(keep),
    }


def compress_state(
    state: Mapping[str, Tensor], targets: Iterable[str], fmt: str = BITMASK
) -> tuple[dict[str, Tensor], list[str]]:
    """(the tensors to store, the weight names compressed): every ``targets`` name that ends in ``.weight`` and the
    format can hold is replaced by its compressed parts, everything else kept as it is."""
    if fmt not in _KEYS:
        raise ValueError(f"unknown sparsity format {fmt!r}; one of {sorted(_KEYS)}")
    targets = set(targets)
    out: dict[str, Tensor] = {}
    done: list[str] = []
    for name, value in state.items():
        t = value.detach().to("cpu")
        ok = name in targets and name.endswith(".weight") and t.dim() >= 1 and t.is_floating_point()
        if ok and t.dim() > 2:
            t = t.reshape(t.shape[0], -1)
        if ok and fmt == SPARSE_24:
            ok = _fits_24(t)
        if not ok:
            out[name] = value.detach().to("cpu").contiguous()
            continue
        prefix = name[: -len(".weight")]
        parts = _bitmask(t) if fmt == BITMASK else _sparse24(t)
        out.update({f"{prefix}.{k}": v for k, v in parts.items()})
        done.append(name)
    return out, done


def decompress_state(
    tensors: Mapping[str, Tensor], fmt: str, compressed: Iterable[str], shapes: Mapping[str, list[int]] | None = None
) -> dict[str, Tensor]:
    """The dense tensors back from :func:`compress_state`'s output; ``compressed`` the weight names it compressed,
    ``shapes`` the dense shapes of those stored as matrices (default: the shape the format records)."""
    shapes = shapes or {}
    keys = _KEYS[fmt]
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for name in compressed:
        prefix = name[: -len(".weight")]
        parts = {k: tensors[f"{prefix}.{k}"] for k in keys}
        used |= {f"{prefix}.{k}" for k in keys}
        shape = [int(s) for s in parts["shape"].flatten().tolist()]
        keep = unpack_bits(parts["bitmask"], shape)
        dense = torch.zeros(shape, dtype=parts["compressed"].dtype)
        dense[keep] = parts["compressed"].flatten()
        out[name] = dense.reshape(shapes[name]) if name in shapes else dense
    out.update({k: v for k, v in tensors.items() if k not in used})
    return out


def write_compressed(
    path: str | os.PathLike, state: Mapping[str, Tensor], targets: Iterable[str], fmt: str = BITMASK
) -> dict:
    """Write ``compressed.safetensors``; {"format", "compressed": names, "kept_dense": pruned names not compressed}."""
    tensors, done = compress_state(state, targets, fmt)
    shapes = {n: list(state[n].shape) for n in done if state[n].dim() > 2}
    meta = {"format": "pt", "sparsity_format": fmt, "compressed": json.dumps(done), "shapes": json.dumps(shapes)}
    atomic_write(Path(path), save_bytes(own_storage(tensors), metadata=meta))
    return {"format": fmt, "compressed": done, "kept_dense": sorted(set(targets) - set(done))}


def read_compressed(path: str | os.PathLike) -> dict[str, Tensor]:
    """The dense state dict a ``compressed.safetensors`` written by :func:`write_compressed` holds."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has keys(), no __iter__)
    fmt = meta.get("sparsity_format", BITMASK)
    if fmt not in _KEYS:
        raise ValueError(f"unknown sparsity format {fmt!r} in {path}")
    return decompress_state(
        tensors, fmt, json.loads(meta.get("compressed", "[]")), json.loads(meta.get("shapes", "{}"))
    )
