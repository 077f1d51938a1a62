"""Whether a running attempt should stop: the ``Control`` flags, and the heartbeat thread that refreshes the
job's ``heartbeat_at`` and picks up a cancel request or the loss of the job."""

from __future__ import annotations

import logging
import threading
from typing import Any

from core.service.db import attempts
from core.service.settings import Settings
from worker.db import Database

log = logging.getLogger("arborist.worker")


def heartbeat_interval(settings: Settings) -> float:
    """A quarter of the timeout, between 0.2 s and 30 s: three missed beats are tolerated."""
    return min(max(settings.heartbeat_timeout_s / 4, 0.2), 30.0)


class Control:
    """Why the run should stop, shared by the hooks, the heartbeat thread and signal handlers."""

    def __init__(self) -> None:
        self.cancel = False
        self.lost = False
        self.interrupted: str | None = None

    def update(self, owned: bool, cancel: bool) -> None:
        if not owned:
            self.lost = True
        if cancel:
            self.cancel = True

    def interrupt(self, reason: str) -> None:
        self.interrupted = reason

    @property
    def stop(self) -> bool:
        return self.cancel or self.lost or self.interrupted is not None


class Heartbeat:
    """A daemon thread that refreshes ``heartbeat_at`` and picks up the cancel flag, while the job runs."""

    def __init__(self, db: Database, job_id: str, attempt: int, control: Control, interval: float):
        self.db, self.job_id, self.attempt, self.control, self.interval = db, job_id, attempt, control, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                owned, cancel = self.db.call(
                    lambda s: attempts.heartbeat(session=s, job_id=self.job_id, attempt=self.attempt),
                    deadline_s=max(self.interval, 1.0),
                    what="heartbeat",
                )
            except Exception as exc:  # noqa: BLE001 (the next beat tries again; the reaper tolerates a few misses)
                log.warning("heartbeat of job %s failed: %s", self.job_id, exc)
                continue
            self.control.update(owned, cancel)
            if not owned:
                log.warning("job %s: attempt %d no longer owns the job; stopping", self.job_id, self.attempt)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
