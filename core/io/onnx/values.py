"""The two kinds of value an imported graph passes around: tensors, and *host values* (numpy object arrays of
Python ints, bools, or SymInts while ``torch.export`` traces) for shape arithmetic; and the conversions between
them that ops share."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["host", "ints", "to_device"]


def ints(v: Tensor | np.ndarray | list | None) -> list[int] | None:
    """A shape/axes operand as a list. Host values keep their elements as they are: under
    ``torch.export`` they are SymInts, and ``int()`` would specialise them."""
    if v is None:
        return None
    if isinstance(v, np.ndarray):
        return v.reshape(-1).tolist()
    return [int(i) for i in (v.tolist() if isinstance(v, Tensor) else v)]


def host(v: Any) -> np.ndarray:
    """An integer value as a host (object) array: what shape arithmetic runs on."""
    return v if isinstance(v, np.ndarray) else np.asarray(v.tolist() if isinstance(v, Tensor) else v, dtype=object)


def to_device(v: np.ndarray, like: Tensor | None) -> Tensor:
    """A host value used as tensor data (e.g. Gather indices) → a tensor beside ``like``."""
    device = like.device if like is not None else None
    return torch.tensor(v.tolist(), dtype=torch.int64 if v.size == 0 else None, device=device)
