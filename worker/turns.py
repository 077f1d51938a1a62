"""A Celery message is a turn: the worker that receives it runs the fairest queued job of the message's queue
(``core.service.db.scheduling``), which need not be the job the message names. Every queued job has its own
message, so every queued job gets a turn; a message whose job already ran in an earlier turn runs the next
fairest one, or (nothing queued) is handled as before (``worker.runner``: a redelivery reclaims, a duplicate
skips). When the only queued jobs belong to tenants at their ``running_jobs`` limit, the turn waits
(``Deferred``; the task is retried after ``DEFER_S``): it is kept for them, since the message of a job may have
been spent on another job's turn."""

from __future__ import annotations

from core.errors import NotFound
from core.service.db import jobs, scheduling
from core.service.limits import running_caps
from core.service.settings import Settings
from worker.db import Database

#: seconds before a turn that found every queued tenant at its running limit is tried again
DEFER_S = 5


class Deferred(Exception):
    """No job may start on this turn now: its tenant, and every other with queued jobs, is at its running limit."""


def job_for_turn(job_id: str, settings: Settings) -> str:
    """The job this message should run (``job_id`` itself when nothing fairer is queued)."""
    default_cap, caps = running_caps(settings)
    db = Database(settings.database_url, pooled=False)
    try:
        try:
            own = db.call(lambda s: jobs.get_unscoped(session=s, job_id=job_id), what="read job")
        except NotFound:
            own = None
        queue = own.queue if own is not None else "cpu"
        chosen = db.call(
            lambda s: scheduling.pick(session=s, queue=queue, default_cap=default_cap, caps=caps), what="schedule"
        )
        waiting = chosen is None and db.call(lambda s: scheduling.has_queued(session=s, queue=queue), what="queue")
    finally:
        db.dispose()
    if chosen is not None:
        return chosen
    if waiting:
        # Jobs wait, all of tenants at their running limit: this turn is theirs later (were it spent on nothing,
        # a job whose own message an earlier turn used would wait for the reaper's resend).
        raise Deferred(f"message of job {job_id}: every tenant with queued jobs is at its running limit")
    return job_id
