"""The backends without a broker: ``embedded`` (the database is the queue) and ``null`` (nothing runs jobs)."""

from __future__ import annotations

import logging

from core.service.queue.base import check_queue

log = logging.getLogger("core.service.queue")


class NullQueue:
    """Accepts and forgets: jobs stay queued. For running the API alone (``ARBORIST_QUEUE_BACKEND=null``)."""

    resends_waiting = False

    def enqueue(self, job_id: str, *, queue: str) -> str | None:
        log.warning("NullQueue: job %s not scheduled (queue %s)", job_id, queue)
        return None

    def revoke(self, task_id: str) -> None:
        return None

    def ping(self) -> bool:
        return True

    def lost_messages(self) -> bool:
        return False


class EmbeddedQueue:
    """The database is the queue: ``enqueue`` has nothing to send (the job row is already ``queued``, and
    ``worker.embedded`` polls for it)."""

    resends_waiting = False

    def enqueue(self, job_id: str, *, queue: str) -> str | None:
        check_queue(queue)
        return None

    def revoke(self, task_id: str) -> None:
        return None

    def ping(self) -> bool:
        return True  # the database is the queue, and readiness checks the database already

    def lost_messages(self) -> bool:
        return False
