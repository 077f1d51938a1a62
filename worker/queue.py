"""``JobQueue`` implementations, registered in ``core.service.queue`` on import.

* ``"celery"``: a task message ``worker.tasks.run_job(job_id)`` on the ``cpu`` or ``gpu`` queue of the broker
  (``Settings.broker_url``). The task is sent by name, so the API process never imports the task module (nor
  torch).
* ``"embedded"``: no broker: the ``queued`` row in SQL *is* the message, and ``worker.embedded`` polls for it.

The API finds these without importing ``worker``: ``Settings.queue_plugins`` names this module, and
``core.service.queue.resolve_queue`` imports it when ``Settings.queue_name`` is not registered yet.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from core.service.queue import register_queue
from core.service.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("arborist.queue")

QUEUES = ("cpu", "gpu")
TASK_NAME = "worker.tasks.run_job"
#: a key the reaper sets in Redis; when it is gone, Redis lost its data and queued messages with it
BROKER_MARKER = "arborist:broker-marker"


def _check_queue(queue: str) -> str:
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; expected one of {QUEUES}")
    return queue


class CeleryQueue:
    """Sends ``run_job`` messages; ``ping`` checks that the broker accepts connections."""

    resend_waiting = True

    def __init__(self, settings: Settings | None = None, *, app: Celery | None = None, ping_timeout_s: float = 2.0):
        if app is None:
            from worker.celery_app import make_celery

            app = make_celery(settings)
        self.app = app
        self.ping_timeout_s = ping_timeout_s

    def enqueue(self, job_id: str, *, queue: str) -> str | None:
        result = self.app.send_task(TASK_NAME, args=[job_id], queue=_check_queue(queue),
                                    retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2,
                                                              "interval_step": 0.5, "interval_max": 2.0})
        return result.id

    def revoke(self, task_id: str) -> None:
        # Without terminate: a running job stops on its cancel flag and records its own final state.
        self.app.control.revoke(task_id)

    def ping(self) -> bool:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=self.ping_timeout_s)
            return bool(conn.connected)

    def _redis(self) -> Any | None:
        url = str(self.app.conf.broker_url or "")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            return None
        import redis

        return redis.Redis.from_url(url, socket_timeout=self.ping_timeout_s, socket_connect_timeout=self.ping_timeout_s)

    def lost_messages(self) -> bool:
        """True once after the broker lost its data (or on the first call ever): Redis restarted without
        persistence, or was flushed. Other brokers: False (RabbitMQ keeps durable queues)."""
        client = self._redis()
        if client is None:
            return False
        try:
            return bool(client.set(BROKER_MARKER, "1", nx=True))
        finally:
            client.close()


class EmbeddedQueue:
    """The database is the queue: ``enqueue`` has nothing to send (the job row is already ``queued``)."""

    resend_waiting = False

    def __init__(self, settings: Settings):
        self.settings = settings

    def enqueue(self, job_id: str, *, queue: str) -> str | None:
        _check_queue(queue)
        return None

    def revoke(self, task_id: str) -> None:
        return None

    def ping(self) -> bool:
        return True  # the database is the queue, and readiness checks the database already


register_queue("celery", lambda settings: CeleryQueue(settings))
register_queue("embedded", lambda settings: EmbeddedQueue(settings))
