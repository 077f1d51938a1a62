"""Jobs as the API handles them: create (idempotent), read, list, cancel, retry, and the columns a finish sets.

Every function takes ``*, session`` and commits its own unit of work. The API's functions take the caller's
``tenant`` (required) and raise ``NotFound`` for another tenant's job; ``get_unscoped`` is for callers without
a tenant (the worker, or a caller that checked the tenant already). Each state change appends a ``state`` event
(the events stream follows them); what workers do to a job is in ``attempts``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.errors import Conflict, IdempotencyMismatch, InvalidInput, NotFound
from core.service.db import inputs
from core.service.db.base import begin_write, utcnow
from core.service.db.outputs import emit
from core.service.db.rows import Page, by_id, page
from core.service.db.tables import ACTIVE_STATES, TERMINAL_STATES, Dataset, Job, JobState, Model, Tenant


def create(
    *,
    session: Session,
    tenant: Tenant,
    model_id: str,
    dataset_id: str,
    spec: dict[str, Any],
    queue: str = "cpu",
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    check: Callable[[Model, Dataset], None] | None = None,
    priority: int = 0,
    admit: Callable[[Session], None] | None = None,
) -> tuple[Job, bool]:
    """A queued job; returns ``(job, created)``.

    With an ``idempotency_key`` already used by this tenant: the same ``request_hash`` returns the existing job
    (``created=False``), a different one raises ``IdempotencyMismatch``. ``check`` (e.g. the API's preflight)
    sees the model and dataset rows of a new job before it is inserted, and raises to refuse it; ``admit`` (the
    tenant's limits: ``usage.admit_job``) runs in the inserting transaction, as a writer, and raises to refuse it.
    """
    if idempotency_key is not None:
        existing = session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key))
        if existing is not None:
            if existing.request_hash != request_hash:
                raise IdempotencyMismatch(
                    "This Idempotency-Key was used with a different request body",
                    errors=[
                        {
                            "loc": ["header", "Idempotency-Key"],
                            "msg": "reused with a different body",
                            "type": "idempotency",
                        }
                    ],
                )
            return existing, False

    errors = []
    model = inputs.find(Model, session=session, tenant=tenant, id=model_id)
    if model is None:
        errors.append({"loc": ["body", "model_id"], "msg": f"model {model_id!r} not found", "type": "not_found"})
    dataset = inputs.find(Dataset, session=session, tenant=tenant, id=dataset_id)
    if dataset is None:
        errors.append({"loc": ["body", "dataset_id"], "msg": f"dataset {dataset_id!r} not found", "type": "not_found"})
    if errors:
        raise InvalidInput("The job refers to unknown inputs", errors=errors)
    if check is not None:
        assert model is not None and dataset is not None
        check(model, dataset)

    # The inputs are looked at again as a writer: a deletion that committed since the look above is seen now, and
    # one not yet started waits for this transaction (SQLite), or fails its check on the new job (PostgreSQL: the
    # foreign keys lock the rows).
    begin_write(session)
    if admit is not None:
        try:
            admit(session)
        except BaseException:
            session.rollback()
            raise
    gone = inputs.missing(session=session, tenant=tenant, model_id=model_id, dataset_id=dataset_id)
    if gone:
        session.rollback()
        raise Conflict(
            "The model or dataset was deleted while the job was being created",
            errors=[{"loc": ["body", f"{kind}_id"], "msg": f"{kind} deleted", "type": "not_found"} for kind in gone],
        )

    job = Job(
        tenant_id=tenant.id,
        model_id=model_id,
        dataset_id=dataset_id,
        spec=spec,
        queue=queue,
        priority=priority,
        state=JobState.QUEUED,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    session.add(job)
    try:
        session.flush()
        emit(session, job.id, "state", {"state": JobState.QUEUED.value})
        session.commit()
    except IntegrityError:
        session.rollback()
        # Lost a race: with a concurrent request carrying the same key (resolve against the winner), or with
        # the deletion of the model or dataset.
        winner = None
        if idempotency_key is not None:
            winner = session.scalar(
                select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key)
            )
        if winner is None:
            raise Conflict("The model or dataset was deleted while the job was being created") from None
        if winner.request_hash != request_hash:
            raise IdempotencyMismatch("This Idempotency-Key was used with a different request body") from None
        return winner, False
    return get_unscoped(session=session, job_id=job.id), True


def get_unscoped(*, session: Session, job_id: str) -> Job:
    """Any tenant's job, read afresh from the database; ``NotFound`` when there is none."""
    job = by_id(session, Job, job_id, fresh=True)
    if job is None:
        raise NotFound(f"Job {job_id!r} not found")
    return job


def get(*, session: Session, tenant: Tenant, job_id: str) -> Job:
    job = get_unscoped(session=session, job_id=job_id)
    if job.tenant_id != tenant.id:
        raise NotFound(f"Job {job_id!r} not found")
    return job


def list_page(
    *,
    session: Session,
    tenant: Tenant,
    state: JobState | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[Job]:
    stmt = select(Job).where(Job.tenant_id == tenant.id)
    if state is not None:
        stmt = stmt.where(Job.state == state)
    return page(session, stmt, Job, limit=limit, cursor=cursor)


def queue_position(*, conn: Connection | Session, job_id: str, queue: str, created_at: Any) -> int:
    """A queued job's place in its queue: 1 + the queued jobs of the same queue (any tenant) created before it."""
    before = or_(Job.created_at < created_at, and_(Job.created_at == created_at, Job.id < job_id))
    ahead = select(func.count()).select_from(Job).where(Job.state == JobState.QUEUED, Job.queue == queue, before)
    return 1 + int(conn.execute(ahead).scalar_one())


def set_task_id(*, session: Session, job_id: str, task_id: str | None) -> None:
    if task_id is None:
        return
    session.execute(
        update(Job).where(Job.id == job_id).values(task_id=task_id).execution_options(synchronize_session=False)
    )
    session.commit()


def _transition(
    session: Session, job_id: str, *, expected: JobState, values: dict[str, Any], event: dict[str, Any]
) -> bool:
    """Compare-and-set on ``state``; appends the state event when the row moved."""
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == expected)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        session.rollback()
        return False
    emit(session, job_id, "state", event)
    session.commit()
    return True


def cancel(*, session: Session, tenant: Tenant, job_id: str) -> Job:
    """Queued → canceled at once; running → canceling (the worker stops at its next check).

    Canceling or canceled jobs are returned unchanged; finished ones raise ``Conflict``.
    """
    for _ in range(5):
        job = get(session=session, tenant=tenant, job_id=job_id)
        state = job.state
        if state in (JobState.CANCELING, JobState.CANCELED):
            return job
        if state in (JobState.SUCCEEDED, JobState.FAILED):
            raise Conflict(f"Job {job_id!r} already {state.value}")
        if state is JobState.QUEUED:
            values = {
                "state": JobState.CANCELED,
                "cancel_requested": True,
                "finished_at": utcnow(),
                "message": "canceled before it started",
            }
            new = JobState.CANCELED
        else:
            values = {"state": JobState.CANCELING, "cancel_requested": True}
            new = JobState.CANCELING
        if _transition(session, job_id, expected=state, values=values, event={"state": new.value}):
            return get_unscoped(session=session, job_id=job_id)
    raise Conflict(f"Job {job_id!r} changed state concurrently; try again")


def retry(*, session: Session, tenant: Tenant, job_id: str) -> Job:
    """Failed or canceled → queued (progress is kept: the worker resumes from its checkpoint)."""
    for _ in range(5):
        job = get(session=session, tenant=tenant, job_id=job_id)
        state = job.state
        if state not in (JobState.FAILED, JobState.CANCELED):
            raise Conflict(f"Only failed or canceled jobs can be retried; job {job_id!r} is {state.value}")
        if job.model_id is None or job.dataset_id is None:
            raise Conflict(f"Job {job_id!r} cannot be retried: its model or dataset was deleted")
        values = {
            "state": JobState.QUEUED,
            "cancel_requested": False,
            "error": None,
            "message": None,
            "finished_at": None,
            "heartbeat_at": None,
            "task_id": None,
            "worker": None,
        }
        if _transition(
            session, job_id, expected=state, values=values, event={"state": JobState.QUEUED.value, "retry": True}
        ):
            return get_unscoped(session=session, job_id=job_id)
    raise Conflict(f"Job {job_id!r} changed state concurrently; try again")


def terminal_values(
    state: JobState, error: dict[str, Any] | None, message: str | None, result: dict[str, Any] | None
) -> dict[str, Any]:
    """The job columns that finishing it sets; ``state`` must be terminal."""
    if state not in TERMINAL_STATES:
        raise ValueError(f"a job can only finish in a terminal state, not {state.value}")
    values: dict[str, Any] = {"state": state, "finished_at": utcnow(), "error": error}
    values.update({k: v for k, v in {"message": message, "result": result}.items() if v is not None})
    if state is JobState.SUCCEEDED:
        values["progress"] = 1.0
    return values


def state_event(state: JobState, error: dict[str, Any] | None = None) -> dict[str, Any]:
    """The data of the ``state`` event for a move to ``state``."""
    return {"state": state.value, **({"error": error} if error is not None else {})}


def finish(
    *,
    session: Session,
    job_id: str,
    state: JobState | str,
    error: dict[str, Any] | None = None,
    message: str | None = None,
    result: dict[str, Any] | None = None,
) -> Job:
    """Moves an active job to a terminal state whoever holds it (the API fails a job it could not enqueue; a worker
    uses ``attempts.finish``). ``error`` is a problem dict (``core.errors``). A terminal job is returned unchanged."""
    state = JobState(state)
    values = terminal_values(state, error, message, result)
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(ACTIVE_STATES))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:
        emit(session, job_id, "state", state_event(state, error))
        session.commit()
    else:
        session.rollback()
    return get_unscoped(session=session, job_id=job_id)


def counts_by_state(*, session: Session, tenant: Tenant | None = None) -> dict[str, int]:
    """Job counts by state: ``tenant``'s (for its /metrics), or over all tenants (an admin's)."""
    stmt = select(Job.state, func.count())
    if tenant is not None:
        stmt = stmt.where(Job.tenant_id == tenant.id)
    rows = session.execute(stmt.group_by(Job.state)).all()
    counts = {s.value: 0 for s in JobState}
    for state, n in rows:
        counts[JobState(state).value] = n
    return counts
