"""Large CPU buffers backed by transparent huge pages.

The Fisher gradient buffer is m × D floats (1 GB at m=1000, D=270,000). Filled once per inverse
build, a fresh buffer costs one page fault per 4 KiB on first touch, which on CPU takes as long as
the per-example gradients themselves. Where the kernel's THP mode is ``madvise`` (the common
default), asking for huge pages cuts that 512-fold. Best effort: elsewhere this is ``torch.empty``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

_HUGE = 1 << 21  # 2 MiB, the x86-64 / arm64 huge page
_MADV_HUGEPAGE = 14
_MIN_BYTES = 4 * _HUGE


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


def large_empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` that, for big CPU tensors, asks the kernel for huge pages before first touch."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if _madvise is None or out.device.type != "cpu" or nbytes < _MIN_BYTES:
        return out
    start = -(-out.data_ptr() // _HUGE) * _HUGE
    end = (out.data_ptr() + nbytes) // _HUGE * _HUGE
    if end > start:
        _madvise(start, end - start, _MADV_HUGEPAGE)  # advisory: failure changes nothing
    return out
