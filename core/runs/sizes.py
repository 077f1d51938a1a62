"""Measured sizes for the report: the dense model's safetensors (written once when the run starts, measured and
deleted), the pruned safetensors and the compressed artifact (:mod:`core.io.compressed`), in bytes on disk."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from core.engine.patterns import Pattern
from core.io.compressed import BITMASK, SPARSE_24
from core.io.model_files import save_state_dict

__all__ = ["compressed_format", "dense_safetensors_bytes", "size_report"]


def compressed_format(pattern: str | None) -> str:
    """compressed-tensors' format for a pattern: the 2:4 format for 2:4, the bitmask for every other."""
    p = Pattern.parse(pattern)
    return SPARSE_24 if p.kind == "nm" and (p.n, p.m) == (2, 4) else BITMASK


def dense_safetensors_bytes(state: Mapping[str, Tensor], scratch: Path) -> int:
    """Bytes of ``state`` saved as safetensors (written to ``scratch``, measured, deleted)."""
    scratch.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_state_dict(dict(state), scratch)
        return scratch.stat().st_size
    finally:
        scratch.unlink(missing_ok=True)


def size_report(dense_bytes: int | None, pruned: Path, compressed: Path, written: dict) -> dict:
    """The report's ``size`` section; ``written`` is :func:`core.io.compressed.write_compressed`'s answer."""
    pruned_bytes, compressed_bytes = os.path.getsize(pruned), os.path.getsize(compressed)
    return {
        "dense_safetensors_bytes": dense_bytes,
        "pruned_safetensors_bytes": pruned_bytes,
        "compressed_bytes": compressed_bytes,
        "compressed_format": written["format"],
        "compressed_to_dense": compressed_bytes / dense_bytes if dense_bytes else None,
        "pruned_to_dense": pruned_bytes / dense_bytes if dense_bytes else None,
        "layers_compressed": len(written["compressed"]),
        "layers_kept_dense": written["kept_dense"],
    }
