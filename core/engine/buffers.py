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

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
#: allocations from this size on get their own mapping, unmapped when freed (``map_large_allocations``)
MMAP_THRESHOLD_BYTES = 1 << 20


def _libc_mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_mallopt = _libc_mallopt()


def map_large_allocations() -> bool:
    """Make every CPU allocation of ``MMAP_THRESHOLD_BYTES`` or more its own mapping, unmapped when it is freed, for
    the rest of the process (glibc only; elsewhere nothing; returns whether it was set).

    glibc's default raises its mmap threshold to the size of each large block freed (up to 32 MiB), so a loop that
    frees and reallocates tensors of a few MiB (the streamed Fisher's per-sample gradients, the Gram slices being
    inverted) leaves them on the heap, where fragmentation keeps freed pages resident: measured 17 to 120 MiB above
    the live tensors on one MiniLM layer, growing with the number of chunks. A fixed threshold turns that
    adjustment off: the resident size follows the live tensors, and the memory plan can be an upper bound. The
    cost is a page fault per 4 KiB of each such allocation, small next to the gradients computed into it."""
    if _mallopt is None:
        return False
    return bool(_mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


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
