"""The ``JobQueue`` interface: how the API (and the reaper) hand a queued job to whatever runs jobs."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

#: the queues a job can be sent to: the API picks one from the spec's device
QUEUES = ("cpu", "gpu")


def check_queue(queue: str) -> str:
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; expected one of {QUEUES}")
    return queue


@runtime_checkable
class JobQueue(Protocol):
    #: whether a queued job's message may be lost, so the reaper sends long-waiting jobs again
    resends_waiting: bool

    def enqueue(self, job_id: str, *, queue: str) -> str | None:
        """Schedules ``job_id`` on ``queue`` ("cpu" or "gpu"); returns a task id when the backend has one."""
        ...

    def revoke(self, task_id: str) -> None:
        """Best effort: drop a task that has not started (running jobs stop on ``cancel_requested``)."""
        ...

    def ping(self) -> bool:
        """Whether the backend can accept work (readiness)."""
        ...

    def lost_messages(self) -> bool:
        """True (once) when the backend lost the messages it held, so every queued job must be sent again; False
        where the backend has no such notion."""
        ...
