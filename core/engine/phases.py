"""Sub-phases of the engine's work (gradients, Gram accumulation, inverse, OBS step), reported to whoever listens.

The engine knows nothing of runs or timers: it wraps each piece of work in ``with phase("gradients"):``, and a
caller that wants the times installs its hook around the call with ``with reporting(hook):``. The hook is held in a
context variable, so concurrent runs in one process (threads) each see their own, and without one ``phase`` costs
nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

PhaseHook = Callable[[str], AbstractContextManager]

_hook: ContextVar[PhaseHook | None] = ContextVar("arborist_phase_hook", default=None)


def phase(name: str) -> AbstractContextManager:
    """A context manager the installed hook times as ``name`` (a no-op without a hook)."""
    hook = _hook.get()
    return hook(name) if hook is not None else nullcontext()


@contextmanager
def reporting(hook: PhaseHook | None) -> Iterator[None]:
    """Install ``hook`` for the engine's phases inside the ``with`` block."""
    token = _hook.set(hook)
    try:
        yield
    finally:
        _hook.reset(token)
