"""``RunHooks`` that write a run's progress, metric points and events to the job's rows, and read its cancel flag.

What they write is strict JSON: non-finite floats become ``null`` (``core.runs.numerics.json_safe``), so an event
or a metric never holds the ``NaN`` that PostgreSQL's JSON type refuses and JSON parsers need not accept."""

from __future__ import annotations

import json
import logging
import math
import time

from core.runs.numerics import json_safe
from core.runs.run import RunHooks
from core.service.db import attempts, outputs
from core.service.db.base import is_transient_db_error
from worker.control import Control
from worker.db import Database

log = logging.getLogger("arborist.worker")


class DbHooks(RunHooks):
    """Throttled progress, every metric point and event, a cached cancel check; all for one attempt."""

    def __init__(
        self,
        db: Database,
        job_id: str,
        attempt: int,
        control: Control,
        *,
        min_interval: float = 0.5,
        event_interval: float = 5.0,
        poll_interval: float = 1.0,
    ):
        self.db, self.job_id, self.attempt, self.control = db, job_id, attempt, control
        self.min_interval, self.event_interval, self.poll_interval = min_interval, event_interval, poll_interval
        self._last_write = self._last_event = -math.inf
        self._last_poll = time.monotonic()
        self._last_message: str | None = None
        self._step: int | None = None
        self._sparsity: float | None = None

    def progress(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        final = fraction >= 1.0
        if not final and now - self._last_write < self.min_interval:
            return
        event = final or message != self._last_message or now - self._last_event >= self.event_interval
        step, sparsity = self._step, self._sparsity
        try:
            owned, cancel = self.db.call(
                lambda s: attempts.write_progress(
                    session=s,
                    job_id=self.job_id,
                    attempt=self.attempt,
                    progress=fraction,
                    step=step,
                    sparsity=sparsity,
                    message=message,
                    event=event,
                ),
                deadline_s=10.0,
                what="progress",
            )
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise
            log.warning("job %s: progress not recorded (%s)", self.job_id, exc)  # the next one will be
            self._last_write = now
            return
        self._last_write = self._last_poll = now
        if event:
            self._last_event, self._last_message = now, message
        self.control.update(owned, cancel)

    def metric(self, point: dict) -> None:
        point = json_safe(point)
        self._step, self._sparsity = int(point["step"]), point.get("sparsity")
        self.db.call(
            lambda s: outputs.add_metric(
                session=s,
                job_id=self.job_id,
                step=int(point["step"]),
                kind=str(point.get("kind", "prune")),
                epoch=point.get("epoch"),
                sparsity=point.get("sparsity"),
                loss=point.get("loss"),
                metric=point.get("metric"),
                seconds=point.get("seconds"),
            ),
            what="metric",
        )

    def event(self, kind: str, data: dict) -> None:
        payload = json.loads(json.dumps(json_safe(data), default=str, allow_nan=False))
        self.db.call(lambda s: outputs.add_event(session=s, job_id=self.job_id, type=kind, data=payload), what="event")

    def cancelled(self) -> bool:
        if self.control.stop:
            return True
        now = time.monotonic()
        if now - self._last_poll >= self.poll_interval:
            self._last_poll = now
            try:
                owned, cancel = self.db.call(
                    lambda s: attempts.control(session=s, job_id=self.job_id, attempt=self.attempt),
                    deadline_s=2.0,
                    what="cancel check",
                )
                self.control.update(owned, cancel)
            except Exception as exc:
                if not is_transient_db_error(exc):
                    raise
        return self.control.stop
