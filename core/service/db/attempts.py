"""What workers and the reaper do to jobs: claim one, then heartbeat, report progress, finish or release it;
find jobs whose worker is gone, requeue or finish them; find queued jobs to run or to send again.

A worker owns a job for one *attempt* (``Job.attempts`` after its ``claim``). Every write below that a worker
makes while running is guarded by that number, so a worker that lost the job (the reaper requeued it and
another worker claimed it) can no longer move it, and learns that it must stop. Keyword-only; each function
commits its own unit of work.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from core.service.db import inputs
from core.service.db.base import utcnow
from core.service.db.jobs import get_unscoped, state_event, terminal_values
from core.service.db.outputs import emit
from core.service.db.tables import Dataset, Job, JobState, Model

RUNNING_STATES = (JobState.RUNNING, JobState.CANCELING)


def _delta(seconds: float | timedelta) -> timedelta:
    return seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)


def _owned(job_id: str, attempt: int) -> Any:
    return and_(Job.id == job_id, Job.attempts == attempt, Job.state.in_(RUNNING_STATES))


def _guarded_update(session: Session, job_id: str, attempt: int, values: dict[str, Any]) -> bool | None:
    """Updates the job if this attempt still owns it; returns ``cancel_requested``, or ``None`` when not owned."""
    flag = session.execute(
        update(Job)
        .where(_owned(job_id, attempt))
        .values(**values)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    return None if flag is None else bool(flag)


# --- the running worker ----------------------------------------------------------------------------------------


def claim(
    *,
    session: Session,
    job_id: str,
    task_id: str | None = None,
    worker: str | None = None,
    stale_after: float | timedelta | None = None,
) -> Job | None:
    """Atomically moves a queued job to running (``attempts`` + 1). ``None`` when someone else has it,
    it was canceled, or it is gone. With ``stale_after``, a running job whose heartbeat is older than that is
    claimed too (redelivery after a worker died)."""
    now = utcnow()
    cond = and_(Job.state == JobState.QUEUED, Job.cancel_requested.is_(False))
    if stale_after is not None:
        cond = or_(cond, and_(Job.state == JobState.RUNNING, Job.heartbeat_at < now - _delta(stale_after)))
    values: dict[str, Any] = {
        "state": JobState.RUNNING,
        "attempts": Job.attempts + 1,
        "started_at": now,
        "heartbeat_at": now,
        "finished_at": None,
    }
    if task_id is not None:
        values["task_id"] = task_id
    if worker is not None:
        values["worker"] = worker
    res = session.execute(
        update(Job).where(Job.id == job_id, cond).values(**values).execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        session.rollback()
        return None
    job = get_unscoped(session=session, job_id=job_id)
    emit(session, job_id, "state", {"state": JobState.RUNNING.value, "attempt": job.attempts})
    session.commit()
    return get_unscoped(session=session, job_id=job_id)


def job_inputs(*, session: Session, job: Job) -> tuple[Model, Dataset]:
    """The rows of the job's model and dataset; ``NotFound`` for one deleted since."""
    return (
        inputs.get_unscoped(Model, session=session, id=job.model_id or ""),
        inputs.get_unscoped(Dataset, session=session, id=job.dataset_id or ""),
    )


def heartbeat(*, session: Session, job_id: str, attempt: int) -> tuple[bool, bool]:
    """Refreshes ``heartbeat_at``; returns ``(owned, cancel_requested)``."""
    flag = _guarded_update(session, job_id, attempt, {"heartbeat_at": utcnow()})
    session.commit()
    return flag is not None, bool(flag)


def control(*, session: Session, job_id: str, attempt: int) -> tuple[bool, bool]:
    """Read-only ``(owned, cancel_requested)`` for this attempt."""
    row = session.execute(select(Job.cancel_requested).where(_owned(job_id, attempt))).scalar_one_or_none()
    session.rollback()
    return row is not None, bool(row)


def write_progress(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    progress: float,
    step: int | None = None,
    sparsity: float | None = None,
    message: str | None = None,
    event: bool = True,
) -> tuple[bool, bool]:
    """Records progress (0..1), which also counts as a heartbeat, and appends a ``progress`` event unless
    ``event=False``; returns ``(owned, cancel_requested)`` (nothing is written when not owned)."""
    values: dict[str, Any] = {"progress": min(max(float(progress), 0.0), 1.0), "heartbeat_at": utcnow()}
    values.update({k: v for k, v in {"step": step, "sparsity": sparsity, "message": message}.items() if v is not None})
    flag = _guarded_update(session, job_id, attempt, values)
    if flag is None:
        session.rollback()
        return False, False
    if event:
        emit(session, job_id, "progress", {k: v for k, v in values.items() if k != "heartbeat_at"})
    session.commit()
    return True, flag


def finish(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    state: JobState | str,
    error: dict[str, Any] | None = None,
    message: str | None = None,
    result: dict[str, Any] | None = None,
) -> bool:
    """Moves the job to a terminal state if this attempt still owns it (``error`` is a problem dict, see
    ``core.errors``). Returns False (and changes nothing) when it does not."""
    state = JobState(state)
    if _guarded_update(session, job_id, attempt, terminal_values(state, error, message, result)) is None:
        session.rollback()
        return False
    emit(session, job_id, "state", state_event(state, error))
    session.commit()
    return True


def release(*, session: Session, job_id: str, attempt: int, reason: str) -> bool:
    """Running → queued (the worker is shutting down): the next claim resumes from the checkpoint."""
    values = {"state": JobState.QUEUED, "worker": None, "task_id": None, "heartbeat_at": None, "message": reason}
    res = session.execute(
        update(Job)
        .where(_owned(job_id, attempt), Job.state == JobState.RUNNING)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        session.rollback()
        return False
    emit(session, job_id, "state", {"state": JobState.QUEUED.value, "requeued": True, "reason": reason})
    session.commit()
    return True


# --- the reaper ----------------------------------------------------------------------------------------------


def _last_sign_of_life() -> Any:
    return func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at)


def stale_jobs(*, session: Session, older_than: float | timedelta) -> list[Job]:
    """Running/canceling jobs whose last heartbeat (or start) is older than ``older_than`` (seconds)."""
    cutoff: datetime = utcnow() - _delta(older_than)
    stmt = select(Job).where(Job.state.in_(RUNNING_STATES), _last_sign_of_life() < cutoff)
    return list(session.scalars(stmt.order_by(Job.id)))


def requeue_lost(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    reason: str,
    older_than: float | timedelta | None = None,
) -> bool:
    """Running → queued for a job whose worker is gone, only if ``attempt`` still holds it and (with
    ``older_than``) its last heartbeat is still that old: a live worker's fresh heartbeat wins the race."""
    cond = and_(Job.id == job_id, Job.attempts == attempt, Job.state == JobState.RUNNING)
    if older_than is not None:
        cond = and_(cond, _last_sign_of_life() < utcnow() - _delta(older_than))
    values = {
        "state": JobState.QUEUED,
        "worker": None,
        "task_id": None,
        "heartbeat_at": None,
        "message": f"requeued: {reason}",
    }
    res = session.execute(update(Job).where(cond).values(**values).execution_options(synchronize_session=False))
    if res.rowcount != 1:
        session.rollback()
        return False
    emit(
        session,
        job_id,
        "state",
        {"state": JobState.QUEUED.value, "requeued": True, "reason": reason, "attempt": attempt},
    )
    session.commit()
    return True


def finish_lost(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    state: JobState | str,
    message: str,
    error: dict[str, Any] | None = None,
    older_than: float | timedelta | None = None,
) -> bool:
    """Running/canceling → terminal for a job whose worker is gone (same guards as ``requeue_lost``)."""
    state = JobState(state)
    cond = and_(Job.id == job_id, Job.attempts == attempt, Job.state.in_(RUNNING_STATES))
    if older_than is not None:
        cond = and_(cond, _last_sign_of_life() < utcnow() - _delta(older_than))
    values = {"state": state, "finished_at": utcnow(), "error": error, "message": message}
    res = session.execute(update(Job).where(cond).values(**values).execution_options(synchronize_session=False))
    if res.rowcount != 1:
        session.rollback()
        return False
    data: dict[str, Any] = {"state": state.value, "reason": message}
    if error is not None:
        data["error"] = error
    emit(session, job_id, "state", data)
    session.commit()
    return True


def waiting_jobs(*, session: Session, older_than: float | timedelta = 0.0, limit: int = 1000) -> list[Job]:
    """Queued jobs (not being canceled) last touched at least ``older_than`` seconds ago, oldest first."""
    cutoff: datetime = utcnow() - _delta(older_than)
    stmt = (
        select(Job)
        .where(Job.state == JobState.QUEUED, Job.cancel_requested.is_(False), Job.updated_at <= cutoff)
        .order_by(Job.created_at, Job.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def mark_resent(*, session: Session, job_id: str, reason: str) -> None:
    """Notes (as an event) that a queued job's message was sent again; this also refreshes ``updated_at``."""
    emit(session, job_id, "resent", {"reason": reason})
    session.commit()


# --- the embedded worker ---------------------------------------------------------------------------------------


def running_jobs(*, session: Session, worker_prefix: str | None = None) -> list[Job]:
    """Running/canceling jobs, optionally only those claimed by workers whose name starts with the prefix."""
    stmt = select(Job).where(Job.state.in_(RUNNING_STATES))
    if worker_prefix is not None:
        stmt = stmt.where(Job.worker.startswith(worker_prefix, autoescape=True))
    return list(session.scalars(stmt.order_by(Job.id)))
