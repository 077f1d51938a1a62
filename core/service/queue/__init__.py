"""How jobs reach workers: the ``JobQueue`` interface, and ``make_queue``, which builds the backend
``Settings.queue_name`` names:

* ``celery``: a task message on a broker (``core.service.queue.celery``), consumed by ``worker.celery_app``;
* ``embedded``: no broker: the ``queued`` row in SQL *is* the message, and ``worker.embedded`` polls for it;
* ``null``: nothing runs jobs (the API alone; they stay queued).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.service.queue.base import QUEUES, JobQueue, check_queue
from core.service.queue.local import EmbeddedQueue, NullQueue

if TYPE_CHECKING:
    from core.service.settings import Settings

__all__ = ["QUEUES", "EmbeddedQueue", "JobQueue", "NullQueue", "check_queue", "make_queue"]


def make_queue(settings: Settings) -> JobQueue:
    """The queue backend ``settings.queue_name`` names."""
    backend = settings.queue_name
    if backend == "celery":
        from core.service.queue.celery import CeleryQueue  # Celery is imported only where it is used

        return CeleryQueue.from_settings(settings)
    if backend == "embedded":
        return EmbeddedQueue()
    return NullQueue()
