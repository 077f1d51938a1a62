"""The Celery backend of ``JobQueue``: a ``run_job(job_id)`` task message on the broker's ``cpu`` or ``gpu`` queue.

Only the sending side lives here, which is all the API and the reaper need: the task is sent by name
(``TASK_NAME``), so no process that sends one imports the task module (nor torch). ``worker.celery_app`` builds
the consuming app on the same ``messaging_config``, and ``worker.tasks`` defines the task under ``TASK_NAME``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from kombu import Exchange, Queue

from core.service.queue.base import QUEUES, check_queue

if TYPE_CHECKING:
    from core.service.settings import Settings

#: the broker when ``Settings.broker_url`` is unset: local Redis db 0 (the production default)
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
TASK_NAME = "worker.tasks.run_job"
#: a key the reaper sets in Redis; when it is gone, Redis lost its data and queued messages with it
BROKER_MARKER = "arborist:broker-marker"
#: how much longer than the longest job a Redis message stays invisible while unacked
VISIBILITY_MARGIN_S = 3600.0


def messaging_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration that senders and workers share: the broker, the queues, the message format.

    No result backend: the job row is the source of truth. A Redis message stays invisible while unacked for
    longer than the longest job (``job_time_limit_s`` + 1 h), so Redis does not redeliver a message whose job
    is still running."""
    return {
        "broker_url": settings.broker_url or DEFAULT_BROKER,
        "result_backend": None,
        "task_ignore_result": True,
        "broker_transport_options": {"visibility_timeout": int(settings.job_time_limit_s + VISIBILITY_MARGIN_S)},
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        "task_default_exchange": "cpu",
        "task_default_routing_key": "cpu",
        "task_default_queue": "cpu",
        "task_create_missing_queues": False,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


class CeleryQueue:
    """Sends ``run_job`` messages through ``app``; ``ping`` checks that the broker accepts connections."""

    resends_waiting = True

    def __init__(self, app: Celery, *, ping_timeout_s: float = 2.0):
        self.app = app
        self.ping_timeout_s = ping_timeout_s

    @classmethod
    def from_settings(cls, settings: Settings) -> CeleryQueue:
        """A queue with an app of its own, configured for sending only."""
        app = Celery("arborist", set_as_current=False)
        app.conf.update(messaging_config(settings))
        return cls(app)

    def enqueue(self, job_id: str, *, queue: str) -> str | None:
        result = self.app.send_task(
            TASK_NAME,
            args=[job_id],
            queue=check_queue(queue),
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0},
        )
        return result.id

    def revoke(self, task_id: str) -> None:
        # Without terminate: a running job stops on its cancel flag and records its own final state.
        self.app.control.revoke(task_id)

    def ping(self) -> bool:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=self.ping_timeout_s)
            return bool(conn.connected)

    def lost_messages(self) -> bool:
        """True once after the broker lost its data (or on the first call ever): Redis restarted without
        persistence, or was flushed. Other brokers: False (RabbitMQ keeps durable queues)."""
        url = str(self.app.conf.broker_url or "")
        if not url.startswith(("redis://", "rediss://", "unix://")):
            return False
        client = redis.Redis.from_url(
            url, socket_timeout=self.ping_timeout_s, socket_connect_timeout=self.ping_timeout_s
        )
        try:
            return bool(client.set(BROKER_MARKER, "1", nx=True))
        finally:
            client.close()
