"""The Celery task: a job id in, the job's state changed in SQL. All the work is in ``worker.runner``."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from core.service.db.base import is_transient_db_error
from core.service.queue.celery import TASK_NAME
from worker import runner
from worker.celery_app import settings_of
from worker.reaper import worker_name
from worker.turns import DEFER_S, Deferred, job_for_turn

#: seconds before a task whose database was unreachable is tried again (doubling, capped)
RETRY_BASE_S = 15
RETRY_MAX_S = 300
#: jobs a turn tries to claim when concurrent turns keep taking the one it chose (each loss is another turn's start)
MAX_CLAIM_RACES = 8


@shared_task(name=TASK_NAME, bind=True, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Any, job_id: str) -> str:
    """Takes the turn this message gives (``worker.turns``: the fairest queued job, ``job_id`` or another), claims
    it (a redelivered or duplicate message finds nothing to claim and returns ``skipped``),
    runs or resumes it, and records the outcome on the job row.

    If the database stays unreachable (past the runner's own retries), the message is re-sent for later: a job
    not yet claimed would otherwise wait in ``queued`` for the reaper's hourly resend; a claimed one is requeued
    by the reaper once its heartbeat is stale, and the retry then finds it again."""
    settings = settings_of(self.app)
    own = job_id
    try:
        job_id = job_for_turn(job_id, settings)  # fair between tenants: this turn may run another queued job
    except Deferred:
        raise self.retry(countdown=DEFER_S, max_retries=None) from None
    except Exception as exc:
        if not is_transient_db_error(exc):
            raise
        raise self.retry(exc=exc, countdown=RETRY_BASE_S, max_retries=None) from exc
    try:
        outcome = _run(self, job_id, settings)
        tried = {job_id}
        while outcome is runner.Outcome.SKIPPED and len(tried) < MAX_CLAIM_RACES:
            # Another turn claimed the job this one chose at the same moment. The turn is not lost: it takes the next
            # fairest queued job (its own, when nothing else is queued), else a queued job whose message the other
            # turn spent would wait for the reaper's resend.
            try:
                job_id = job_for_turn(own, settings)
            except Deferred:
                raise self.retry(countdown=DEFER_S, max_retries=None) from None
            if job_id in tried:
                if own in tried:
                    break
                job_id = own
            tried.add(job_id)
            outcome = _run(self, job_id, settings)
        return outcome.value
    except Exception as exc:
        if not is_transient_db_error(exc):
            raise
        countdown = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** min(self.request.retries, 8))
        raise self.retry(exc=exc, countdown=countdown, max_retries=None) from exc


def _run(task: Any, job_id: str, settings: Any) -> runner.Outcome:
    return runner.run_job(
        job_id,
        settings,
        worker=worker_name(task.request.hostname or "celery"),
        task_id=task.request.id,
        time_limit_errors=(SoftTimeLimitExceeded,),
    )
