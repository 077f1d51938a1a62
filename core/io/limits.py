"""How big a model file may become once loaded: the caps that keep a small crafted file from allocating gigabytes.

A safetensors file names an architecture whose size comes from ``arch_kwargs``, not from the file; an ONNX graph
can build tensors from shapes (``ConstantOfShape``, ``Expand``, ``Pad``, broadcasting…) when its constants are
folded. Both are bounded before anything is allocated: :class:`LoadLimits` holds the caps (the service fills them
from its settings), :func:`check_limit` refuses with a :class:`~core.errors.LimitExceeded` that carries the
numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from core.errors import LimitExceeded

__all__ = ["DEFAULT_LIMITS", "UNLIMITED", "LoadLimits", "check_limit", "elements"]


@dataclass(frozen=True)
class LoadLimits:
    """Caps on what loading one model file may build (``None``: no cap).

    ``max_parameters``: parameters of the model (a zoo architecture is counted on the ``meta`` device first).
    ``max_constant_elements``: elements of the constants an ONNX import computes from the graph (folded values, all
    together) and of any tensor a node would build from a constant shape.
    ``max_archive_files`` / ``max_archive_bytes``: entries of a model archive (a Hugging Face folder as a .zip or
    .tar.gz) and the bytes they declare once extracted (:mod:`core.io.hf.archive`)."""

    max_parameters: int | None = 2**28
    max_constant_elements: int | None = 2**27
    max_archive_files: int | None = 1000
    max_archive_bytes: int | None = 8 * 1024**3


#: the caps of an untrusted file when the caller names none (the service's settings default to the same numbers)
DEFAULT_LIMITS = LoadLimits()
#: no caps: for files that were checked when they were uploaded, or that are the caller's own
UNLIMITED = LoadLimits(max_parameters=None, max_constant_elements=None, max_archive_files=None, max_archive_bytes=None)


def elements(shape: Sequence[int]) -> int:
    """The number of elements of a tensor of ``shape`` (exact: Python ints do not overflow)."""
    return math.prod(int(d) for d in shape)


def check_limit(
    count: int, limit: int | None, *, what: str, unit: str = "elements", setting: str, loc: list[str]
) -> None:
    """``count`` within ``limit``, else :class:`LimitExceeded`: "{what} {count} {unit}, over the limit of
    {limit} ({setting})", ``setting`` being the ``ARBORIST_*`` variable that raises it; ``loc`` locates the
    culprit in the problem's ``errors``."""
    if limit is None or count <= limit:
        return
    detail = f"{what} {count:,} {unit}, over the limit of {limit:,} ({setting})"
    raise LimitExceeded(detail, errors=[{"loc": loc, "msg": detail, "type": "limit_exceeded"}])
