"""Upload validation in a short-lived child process.

Validating an uploaded model or dataset loads all of it and applies every check a run would (``core.io.model_files``,
``core.io.data``): a 1 GiB dataset briefly needs ~2.7 GiB. In the API process that memory would come and go in the
server that holds every connection (``bench/upload_rss.py``), and a crafted file that crashes a native parser
(safetensors, numpy, pyarrow, onnx) would take the server down with it. So the API runs validators here: each call
in a child process of its own, forked from a fork server that imported the validators once (the first call starts
it), gone when the call returns. The result, or the exception (domain errors pickle whole, ``errors`` included),
comes back over a pipe. Every byte of an upload is parsed here (format detection included), none in the API process.

Each child may allocate a bounded amount of memory (``RLIMIT_DATA``, set in the child on top of what it starts
with: torch's libraries are mapped read-only and count against ``RLIMIT_AS`` but not here, so the limit is about
what validation allocates). An allocation past it fails inside the child (``MemoryError``, torch's allocator
error), which comes back as a :class:`~core.errors.LimitExceeded` (413) with the limit and what was being built;
a child killed outright (the kernel's OOM killer: ``SIGKILL``) is one too, and one that crashed otherwise is a
:class:`ValidatorCrashed` (422): never a server error.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import resource
import signal
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

from core.errors import InvalidInput, LimitExceeded, out_of_memory_error
from core.service.settings import MiB, Settings

T = TypeVar("T")

#: validation loads a file whole, so the memory limit grows with the file on top of ``Settings.validation_memory_mb``.
#: Measured peaks (RSS growth of the child): a ResNet-50's 98 MiB safetensors +324 MiB, its 98 MiB ONNX +502 MiB
#: (the protobuf, its shape-inferred copy, the tensors, the layers), a 300 MiB .npz dataset +848 MiB
BYTES_PER_FILE_BYTE = 4

#: imported once by the fork server, so a child starts with torch and the validators loaded ("__main__": the
#: server's entry script, e.g. uvicorn's, which multiprocessing would otherwise re-run in every child)
PRELOAD = [
    "__main__",
    "core.io.data",
    "core.io.model_files",
    "core.io.zoo",
    "safetensors.torch",
    "core.io.onnx.warm",
    "core.io.hf.validate",
    "core.io.hf.warm",
]

_lock = threading.Lock()
_context: BaseContext | None = None


class ValidatorCrashed(InvalidInput):
    """The validation process died without an answer, not for lack of memory: the file crashed a native parser."""


def memory_limit(settings: Settings, file_size: int) -> int:
    """Bytes a validation child may allocate for a file of ``file_size`` bytes."""
    return settings.validation_memory_mb * MiB + BYTES_PER_FILE_BYTE * file_size


def _mib(n: int) -> str:
    return f"{n / MiB:,.0f} MiB"


def _data_bytes() -> int:
    """This process's data segment now (``VmData``: what ``RLIMIT_DATA`` counts), or 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _limit_memory(limit: int) -> None:
    """Lets this process allocate ``limit`` more bytes than it holds now, no more (soft and hard limit)."""
    cap = _data_bytes() + limit
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def _over_limit(limit: int, exc: BaseException) -> LimitExceeded:
    """The problem for a validation that ran out of its memory: the limit and what was being built."""
    what = re.sub(r"\[enforce fail at [^\]]*\] (err == 0\. )?", "", str(exc)) or type(exc).__name__
    detail = (
        f"validating the file needs more memory than its limit of {_mib(limit)} (ARBORIST_VALIDATION_MEMORY_MB, "
        f"plus {BYTES_PER_FILE_BYTE} bytes per byte of the file): {what}"
    )
    return LimitExceeded(detail, errors=[{"loc": ["file"], "msg": detail, "type": "limit_exceeded"}])


def _died(exitcode: int | None, limit: int | None) -> InvalidInput:
    """The problem for a validation process that ended without an answer."""
    limit_text = f"its memory limit was {_mib(limit)}" if limit is not None else "it had no memory limit"
    if exitcode is None or exitcode >= 0:
        return ValidatorCrashed(f"the validation process ended without an answer (exit code {exitcode}); {limit_text}")
    name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
    if -exitcode == signal.SIGKILL:
        detail = f"the validation process was killed ({name}), most likely by the kernel for lack of memory"
        return LimitExceeded(f"{detail}; {limit_text}")
    return ValidatorCrashed(f"the file crashed the validation process ({name}); {limit_text}")


def _get_context() -> BaseContext:
    global _context
    with _lock:
        if _context is None:
            if "forkserver" in mp.get_all_start_methods():
                ctx = mp.get_context("forkserver")
                ctx.set_forkserver_preload(PRELOAD)
            else:  # pragma: no cover - not Linux/macOS
                ctx = mp.get_context("spawn")
            _context = ctx
        return _context


def _child(conn: Connection, fn: Callable[..., Any], args: tuple, kwargs: dict, limit: int | None) -> None:
    if limit is not None:
        _limit_memory(limit)
    try:
        answer: tuple[bool, Any] = (True, fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 (every failure goes back to the parent)
        if limit is not None and not isinstance(exc, LimitExceeded) and out_of_memory_error(exc) is not None:
            exc = _over_limit(limit, exc)
        exc.add_note("raised in the validation process:\n" + traceback.format_exc())  # the traceback does not pickle
        answer = (False, exc)
    try:
        conn.send(answer)
    except Exception:  # noqa: BLE001 (an answer that does not pickle)
        value = answer[1]
        conn.send((False, RuntimeError(f"unpicklable answer from the validator: {type(value).__name__}: {value}")))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., T], *args: Any, memory_limit: int | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a child process that may allocate ``memory_limit`` bytes (``None``: no limit);
    returns its result or raises its exception. Blocking: call it from a worker thread. ``fn`` and its arguments
    must pickle (module-level functions, plain values, paths)."""
    ctx = _get_context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child, args=(sender, fn, args, kwargs, memory_limit), name="arborist-validate", daemon=True
    )
    try:
        try:
            proc.start()
        finally:
            sender.close()  # the child has its copy; without ours, its death ends recv() with EOFError
        try:
            ok, value = receiver.recv()
        except EOFError:
            proc.join()
            raise _died(proc.exitcode, memory_limit) from None
    finally:
        receiver.close()
        if proc.pid is not None:
            proc.join()
    if ok:
        return value
    raise value
