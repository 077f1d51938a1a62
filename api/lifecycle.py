"""Knowing that the server is shutting down.

On SIGTERM/SIGINT uvicorn stops accepting connections and then waits for every open response to finish
before it stops. An events stream (``GET /v1/jobs/{id}/events``) lasts until its job ends, so one open stream
would hold a rolling restart for as long as ``sse_max_seconds``. The lifespan wraps the server's signal
handlers: the signal still reaches the server, and ``shutting_down(app)`` turns true so that streams end at
once (without ``event: end``; the client reconnects with ``Last-Event-ID`` to the next server).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("arborist.api")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def shutting_down(app: Any) -> bool:
    return bool(getattr(app.state, "shutting_down", False))


def watch_shutdown_signals(app: Any) -> Callable[[], None]:
    """Chains a handler in front of the current SIGTERM/SIGINT handlers (the server's: uvicorn installs them
    before the lifespan starts) that marks ``app.state.shutting_down``. Returns the undo. Does nothing off the
    main thread (a test client's lifespan) or where no Python handler is installed."""
    app.state.shutting_down = False
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    installed: list[tuple[int, Any, Any]] = []
    for sig in SIGNALS:
        previous = signal.getsignal(sig)
        if not callable(previous) or previous is signal.default_int_handler:
            continue  # no server handler to chain: the signal stops the process anyway

        def handler(signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous) -> None:
            if not app.state.shutting_down:
                log.info("signal %d: shutting down; open event streams are closed", signum)
            app.state.shutting_down = True
            previous(signum, frame)

        signal.signal(sig, handler)
        installed.append((sig, handler, previous))

    def undo() -> None:
        for sig, handler, previous in installed:
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous)

    return undo
