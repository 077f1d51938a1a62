"""The reaper: nothing stays ``running`` after its worker died, nothing stays ``queued`` after the broker lost it.

A sweep does three things.

1. Jobs in ``running``/``canceling`` whose last heartbeat is older than ``Settings.heartbeat_timeout_s`` lost
   their worker (SIGKILL, OOM, a lost host, a container stopped past its grace period). They go back to
   ``queued`` and are enqueued again; the next worker resumes from the job's last checkpoint (the checkpoint
   directory lives in the artifact store, shared by all workers). A job that already used
   ``Settings.max_attempts`` attempts fails instead, with a ``worker-lost`` problem; one that was being
   canceled ends ``canceled``. Every transition is a compare-and-set on (state, attempt, heartbeat age), so
   a worker whose heartbeat arrives late keeps its job, and several reapers may run at once.
2. Queued jobs whose message the broker may have lost are sent again: all of them when the broker says it lost
   its data (Redis restarted without persistence: ``JobQueue.lost_messages()``), otherwise those queued for
   longer than ``RESEND_AFTER_S`` (a bounded number of duplicates; a duplicate is harmless because a task
   only runs a job it can claim in SQL).
3. Enqueues that failed in an earlier sweep (broker down) are retried.

It runs inside every Celery worker's main process on the event loop's timer (``worker.celery_app``), inside
the embedded worker's poll loop (``worker.embedded``), or alone: ``python -m worker.reaper``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from core.errors import WorkerLost, problem_from_error
from core.service.db import attempts, jobs
from core.service.db.tables import Job, JobState
from core.service.queue import JobQueue, make_queue
from core.service.settings import Settings, get_settings
from worker.db import Database

log = logging.getLogger("arborist.reaper")

#: a queued job is re-sent to the broker after waiting this long (unless the queue says it needs no resends)
RESEND_AFTER_S = 3600.0


# --- who holds a job ---------------------------------------------------------------------------------------


def worker_name(node: str, pid: int | None = None) -> str:
    """What a worker writes into ``Job.worker``: its node name and the pid of the process running the job."""
    return f"{node}:{os.getpid() if pid is None else pid}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; its parent just has not reaped it yet
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def holder_dead_here(holder: str | None, me: str) -> bool:
    """True when the job's holder ran on this node (same node name) in a process that no longer exists."""
    if not holder or ":" not in holder:
        return False
    node, _, pid = holder.rpartition(":")
    if node != me.rpartition(":")[0] or not pid.isdigit():
        return False
    return not pid_alive(int(pid))


# --- one lost job --------------------------------------------------------------------------------------------


def handle_lost(db: Database, job: Job, settings: Settings, *, reason: str, older_than: float | None = None) -> str:
    """Requeue (or give up on, or finish canceling) a job whose worker is gone.

    Returns ``"requeued"``, ``"failed"``, ``"canceled"``, or ``"raced"`` when the job moved meanwhile
    (a late heartbeat, another reaper)."""
    attempt = job.attempts
    if job.state is JobState.CANCELING or job.cancel_requested:
        ok = db.call(
            lambda s: attempts.finish_lost(
                session=s,
                job_id=job.id,
                attempt=attempt,
                state=JobState.CANCELED,
                older_than=older_than,
                message=f"canceled ({reason}); the last checkpoint is kept",
            ),
            what="reaper: cancel lost job",
        )
        outcome = "canceled" if ok else "raced"
    elif attempt >= settings.max_attempts:
        exc = WorkerLost(
            f"{reason}; gave up after {attempt} attempt(s) (max_attempts={settings.max_attempts}). "
            "The last checkpoint is kept: retrying the job resumes from it."
        )
        error = problem_from_error(exc, instance=f"/v1/jobs/{job.id}", attempts=attempt)
        ok = db.call(
            lambda s: attempts.finish_lost(
                session=s,
                job_id=job.id,
                attempt=attempt,
                state=JobState.FAILED,
                older_than=older_than,
                message=exc.detail,
                error=error,
            ),
            what="reaper: fail lost job",
        )
        outcome = "failed" if ok else "raced"
    else:
        ok = db.call(
            lambda s: attempts.requeue_lost(
                session=s, job_id=job.id, attempt=attempt, reason=reason, older_than=older_than
            ),
            what="reaper: requeue lost job",
        )
        outcome = "requeued" if ok else "raced"
    log.warning("job %s (attempt %d, worker %s): %s -> %s", job.id, attempt, job.worker, reason, outcome)
    return outcome


# --- the sweep -----------------------------------------------------------------------------------------------


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed or self.canceled or self.resent)


class Reaper:
    """``sweep()`` once per ``Settings.reaper_interval_s``; safe to run in several processes at once."""

    def __init__(self, settings: Settings, *, queue: JobQueue | None = None, db: Database | None = None):
        self.settings = settings
        # No pool: sweeps are rare, and a Celery worker forks its children from the process running this.
        self.db = db or Database(settings.database_url, pooled=False)
        self._queue = queue
        self._unsent: dict[str, str] = {}  # job id → queue name, enqueues that failed

    @property
    def queue(self) -> JobQueue:
        if self._queue is None:
            self._queue = make_queue(self.settings)
        return self._queue

    def _send(self, job_id: str, queue_name: str) -> bool:
        try:
            task_id = self.queue.enqueue(job_id, queue=queue_name)
        except Exception as exc:  # noqa: BLE001 (the broker may fail in any way; the job is retried next sweep)
            log.warning("enqueue of job %s failed (%s); retrying next sweep", job_id, exc)
            self._unsent[job_id] = queue_name
            return False
        self._unsent.pop(job_id, None)
        if task_id:
            self.db.call(lambda s: jobs.set_task_id(session=s, job_id=job_id, task_id=task_id), what="set task id")
        return True

    def _resend_needed(self) -> float | None:
        """How long a queued job must have waited to be re-sent (0 = all), or None for no resend."""
        if not self.queue.resends_waiting:
            return None
        try:
            if self.queue.lost_messages():
                log.warning("the broker lost its messages (restarted without persistence?): re-sending queued jobs")
                return 0.0
        except Exception as exc:  # noqa: BLE001 (a broker that cannot answer is asked again later)
            log.warning("cannot ask the broker whether it lost messages: %s", exc)
        return RESEND_AFTER_S

    def sweep(self) -> SweepReport:
        report = SweepReport()
        timeout = self.settings.heartbeat_timeout_s
        stale = self.db.call(
            lambda s: attempts.stale_jobs(session=s, older_than=timeout), deadline_s=10, what="reaper: stale jobs"
        )
        for job in stale:
            reason = f"no heartbeat for {timeout:g}s from worker {job.worker or '?'}"
            outcome = handle_lost(self.db, job, self.settings, reason=reason, older_than=timeout)
            if outcome == "requeued":
                report.requeued.append(job.id)
                self._send(job.id, job.queue)
            elif outcome in ("failed", "canceled"):
                getattr(report, outcome).append(job.id)

        for job_id, queue_name in list(self._unsent.items()):
            self._send(job_id, queue_name)

        waited = self._resend_needed()
        if waited is not None:
            waiting = self.db.call(
                lambda s: attempts.waiting_jobs(session=s, older_than=waited),
                deadline_s=10,
                what="reaper: waiting jobs",
            )
            for job in waiting:
                if job.id in report.requeued:
                    continue
                reason = "broker lost its messages" if waited == 0 else f"queued for over {waited:g}s"
                if self._send(job.id, job.queue):
                    self.db.call(
                        lambda s, j=job.id, why=reason: attempts.mark_resent(session=s, job_id=j, reason=why),
                        what="reaper: mark resent",
                    )
                    report.resent.append(job.id)
        if report:
            log.info("reaper sweep: %s", report)
        return report

    def safe_sweep(self) -> SweepReport | None:
        """``sweep()`` that logs instead of raising (for timers and loops)."""
        try:
            return self.sweep()
        except Exception:
            log.exception("reaper sweep failed")
            return None

    def close(self) -> None:
        self.db.dispose()


def run_forever(settings: Settings | None = None, *, stop: Any = None) -> None:
    """Sweeps every ``reaper_interval_s`` until ``stop`` (a ``threading.Event``) is set."""
    settings = settings or get_settings()
    reaper = Reaper(settings)
    log.info(
        "reaper: every %gs, heartbeat timeout %gs, max attempts %d",
        settings.reaper_interval_s,
        settings.heartbeat_timeout_s,
        settings.max_attempts,
    )
    try:
        while stop is None or not stop.is_set():
            reaper.safe_sweep()
            if stop is not None:
                stop.wait(settings.reaper_interval_s)
            else:
                time.sleep(settings.reaper_interval_s)
    finally:
        reaper.close()


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_forever()
