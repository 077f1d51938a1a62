"""Upload validation in a short-lived child process.

Validating an uploaded model or dataset loads all of it and applies every check a run would (``core.io.model_files``,
``core.io.data``): a 1 GiB dataset briefly needs ~2.7 GiB. In the API process that memory would come and go in the
server that holds every connection (``bench/upload_rss.py``), and a crafted file that crashes a native parser
(safetensors, numpy, pyarrow, onnx) would take the server down with it. So the API runs validators here: each call
in a child process of its own, forked from a fork server that imported the validators once (the first call starts
it), gone when the call returns. The result, or the exception (domain errors pickle whole, ``errors`` included),
comes back over a pipe; a child that dies (killed, out of memory, crashed) is a ``ValidatorCrashed``.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

T = TypeVar("T")

#: imported once by the fork server, so a child starts with torch and the validators loaded ("__main__": the
#: server's entry script, e.g. uvicorn's, which multiprocessing would otherwise re-run in every child)
PRELOAD = ["__main__", "core.io.data", "core.io.model_files", "core.io.zoo", "safetensors.torch"]

_lock = threading.Lock()
_context: BaseContext | None = None


class ValidatorCrashed(RuntimeError):
    """The validation process ended without an answer (a server-side failure: 500)."""


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


def _child(conn: Connection, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        answer: tuple[bool, Any] = (True, fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 (every failure goes back to the parent)
        exc.add_note("raised in the validation process:\n" + traceback.format_exc())  # the traceback does not pickle
        answer = (False, exc)
    try:
        conn.send(answer)
    except Exception:  # noqa: BLE001 (an answer that does not pickle)
        value = answer[1]
        conn.send((False, ValidatorCrashed(f"unpicklable answer from the validator: {type(value).__name__}: {value}")))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a child process; returns its result or raises its exception. Blocking: call it
    from a worker thread. ``fn`` and its arguments must pickle (module-level functions, plain values, paths)."""
    ctx = _get_context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, args, kwargs), name="arborist-validate", daemon=True)
    try:
        try:
            proc.start()
        finally:
            sender.close()  # the child has its copy; without ours, its death ends recv() with EOFError
        try:
            ok, value = receiver.recv()
        except EOFError:
            proc.join()
            raise ValidatorCrashed(f"the validation process died (exit code {proc.exitcode})") from None
    finally:
        receiver.close()
        if proc.pid is not None:
            proc.join()
    if ok:
        return value
    raise value
