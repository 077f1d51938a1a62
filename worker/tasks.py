"""The Celery task: a job id in, the job's state changed in SQL. All the work is in ``worker.runner``."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from worker import runner
from worker.celery_app import settings_of
from worker.queue import TASK_NAME
from worker.reaper import worker_name


@shared_task(name=TASK_NAME, bind=True, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Any, job_id: str) -> str:
    """Claims ``job_id`` (a redelivered or duplicate message finds nothing to claim and returns ``skipped``),
    runs or resumes it, and records the outcome on the job row."""
    return runner.run_job(
        job_id,
        settings_of(self.app),
        worker=worker_name(self.request.hostname or "celery"),
        task_id=self.request.id,
        time_limit_errors=(SoftTimeLimitExceeded,),
    )
