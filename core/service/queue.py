"""The enqueue interface between the API and whatever runs jobs, and a small registry of implementations.

The API only ever sees a ``JobQueue``. Implementations register a factory under a name (the worker registers
``"celery"``, and ``"embedded"`` for the broker-less mode); ``Settings.queue_name`` picks one.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from core.service.settings import Settings

log = logging.getLogger(__name__)


@runtime_checkable
class JobQueue(Protocol):
    def enqueue(self, job_id: str, *, queue: str) -> str | None:
        """Schedules ``job_id`` on ``queue`` ("cpu" or "gpu"); returns a task id when the backend has one."""
        ...

    def revoke(self, task_id: str) -> None:
        """Best effort: drop a task that has not started (running jobs stop on ``cancel_requested``)."""
        ...

    def ping(self) -> bool:
        """Whether the backend can accept work (readiness)."""
        ...


QueueFactory = Callable[["Settings"], JobQueue]

_registry: dict[str, QueueFactory] = {}
_lock = threading.Lock()


def register_queue(name: str, factory: QueueFactory) -> None:
    """Registers ``factory(settings) -> JobQueue`` under ``name`` (a later registration replaces it)."""
    with _lock:
        _registry[name] = factory


def registered_queues() -> list[str]:
    return sorted(_registry)


def resolve_queue(settings: Settings, name: str | None = None) -> JobQueue:
    """The queue named ``name`` (default ``settings.queue_name``). Modules in ``settings.queue_plugins`` are
    imported first if the name is not registered yet (they register on import)."""
    name = name or settings.queue_name
    if name not in _registry:
        for module in settings.queue_plugins:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name is None or not module.startswith(exc.name):
                    raise
                log.debug("queue plugin %s not importable", module)
            if name in _registry:
                break
    try:
        factory = _registry[name]
    except KeyError:
        raise LookupError(
            f"no JobQueue registered as {name!r} (registered: {', '.join(registered_queues()) or 'none'})"
        ) from None
    return factory(settings)


class NullQueue:
    """Accepts and forgets: jobs stay queued. For running the API alone (``ARBORIST_QUEUE_BACKEND=null``)."""

    def enqueue(self, job_id: str, *, queue: str) -> str | None:
        log.warning("NullQueue: job %s not scheduled (queue %s)", job_id, queue)
        return None

    def revoke(self, task_id: str) -> None:
        return None

    def ping(self) -> bool:
        return True


register_queue("null", lambda settings: NullQueue())
