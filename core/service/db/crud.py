"""Keyword-only data functions shared by the API, the worker and the CLI.

Every function takes ``*, session`` and commits its own unit of work. API-facing lookups take the caller's
``tenant`` and raise ``NotFound`` for rows of another tenant; worker-facing functions take a bare ``job_id``.
Job state changes happen only here, and each one appends a ``state`` event (the events stream follows them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, and_, bindparam, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from core.service.db.base import utcnow
from core.service.db.models import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    ApiKey,
    Artifact,
    Dataset,
    Job,
    JobEvent,
    JobMetric,
    JobState,
    Model,
    Tenant,
)
from core.errors import InvalidInput
from core.errors import Conflict, IdempotencyMismatch, NotFound, Unauthorized

T = TypeVar("T")

KEY_PREFIX = "arb"
MAX_PAGE = 200


# --- pagination -------------------------------------------------------------------------------------------


@dataclass
class Page(Generic[T]):
    items: list[T]
    count: int
    next_cursor: str | None


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


_ID_RE = re.compile(r"[a-z]{1,8}_[0-9a-f]{28}")


def is_id(value: object) -> bool:
    """Whether ``value`` looks like an id this service issued (checked before it reaches SQL)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def _get(session: Session, model: Any, id: str, *, lock: bool = False) -> Any:
    if not is_id(id):
        return None
    return session.get(model, id, with_for_update=True, populate_existing=True) if lock else session.get(model, id)


def decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    if not is_id(raw):
        raise InvalidInput(
            "Malformed pagination cursor",
            errors=[{"loc": ["query", "cursor"], "msg": "not a cursor returned by this API", "type": "cursor"}],
        )
    return raw


def _page(session: Session, stmt: Any, model: Any, *, limit: int, cursor: str | None) -> Page[Any]:
    """Newest first (ids are time-ordered); the cursor is the last id of the previous page."""
    limit = max(1, min(int(limit), MAX_PAGE))
    count = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    if cursor:
        stmt = stmt.where(model.id < decode_cursor(cursor))
    rows = list(session.scalars(stmt.order_by(model.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(items=rows, count=count, next_cursor=encode_cursor(rows[-1].id) if more and rows else None)


# --- tenants and API keys ---------------------------------------------------------------------------------


def get_or_create_tenant(*, session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant
    tenant = Tenant(name=name)
    session.add(tenant)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        tenant = session.scalars(select(Tenant).where(Tenant.name == name)).one()
    return tenant


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(*, session: Session, tenant: Tenant, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key for ``tenant``: returns the row and the plaintext key (shown once, never stored)."""
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=hash_key(key), name=name)
    session.add(row)
    session.commit()
    return row, key


def revoke_api_key(*, session: Session, prefix: str) -> ApiKey:
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix)) if "\x00" not in prefix else None
    if row is None:
        raise NotFound(f"No API key with prefix {prefix!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def list_api_keys(*, session: Session, tenant: Tenant | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.created_at)
    if tenant is not None:
        stmt = stmt.where(ApiKey.tenant_id == tenant.id)
    return list(session.scalars(stmt))


def key_prefix(token: str) -> str:
    """The public prefix of a well-formed key (``arb_<prefix>_<secret>``); ``Unauthorized`` otherwise."""
    parts = token.split("_", 2)
    if "\x00" in token or len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        raise Unauthorized("Malformed API key")
    return parts[1]


def _check_key(token: str, key_hash: str | None, revoked_at: datetime | None) -> None:
    if key_hash is None or not hmac.compare_digest(key_hash, hash_key(token)):
        raise Unauthorized("Invalid API key")
    if revoked_at is not None:
        raise Unauthorized("API key revoked")


def authenticate(*, session: Session, token: str) -> Tenant:
    """The tenant owning the bearer ``token``; ``Unauthorized`` if it is malformed, unknown or revoked."""
    prefix = key_prefix(token)
    # One round trip: the key and its tenant together (every authenticated request runs this).
    row = session.scalar(
        select(ApiKey).options(joinedload(ApiKey.tenant, innerjoin=True)).where(ApiKey.prefix == prefix)
    )
    _check_key(token, row and row.key_hash, row and row.revoked_at)
    assert row is not None
    return row.tenant


_KEYS, _JOBS = ApiKey.__table__, Job.__table__
#: The key by its prefix, and the job if it is this key's tenant's. Built once (SQLAlchemy then keys its compiled
#: form on this very object), over tables rather than mapped classes, so no ORM step runs.
_AUTHENTICATED_JOB = (
    select(_KEYS.c.key_hash, _KEYS.c.revoked_at, *_JOBS.c)
    .select_from(
        _KEYS.outerjoin(_JOBS, and_(_JOBS.c.id == bindparam("job_id"), _JOBS.c.tenant_id == _KEYS.c.tenant_id))
    )
    .where(_KEYS.c.prefix == bindparam("prefix"))
)
_JOB_KEYS = tuple(column.key for column in _JOBS.c)


def authenticated_job(*, conn: Connection, token: str, job_id: str) -> dict[str, Any]:
    """``authenticate`` then ``get_job`` (same errors, same tenant scoping) in one round trip, on a bare connection:
    the job's columns by name. For the status poll, the API's hottest path, where the ORM's bookkeeping and a
    second query cost more than the lookups themselves."""
    row = conn.execute(
        _AUTHENTICATED_JOB, {"prefix": key_prefix(token), "job_id": job_id if is_id(job_id) else ""}
    ).one_or_none()
    _check_key(token, row and row[0], row and row[1])
    assert row is not None
    job = dict(zip(_JOB_KEYS, row[2:]))
    if job["id"] is None:
        raise NotFound(f"Job {job_id!r} not found")
    return job


# --- models and datasets ----------------------------------------------------------------------------------


def create_model(
    *,
    session: Session,
    tenant: Tenant,
    name: str,
    format: str,
    size: int,
    sha256: str,
    path: str,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    num_parameters: int | None = None,
    id: str | None = None,
) -> Model:
    row = Model(
        tenant_id=tenant.id,
        name=name,
        format=format,
        arch=arch,
        arch_kwargs=arch_kwargs,
        size=size,
        sha256=sha256,
        path=path,
        num_parameters=num_parameters,
    )
    if id is not None:
        row.id = id
    session.add(row)
    session.commit()
    return row


def get_model(*, session: Session, tenant: Tenant | None, model_id: str) -> Model:
    """``tenant=None`` is for the worker (no scoping)."""
    row = _get(session, Model, model_id)
    if row is None or (tenant is not None and row.tenant_id != tenant.id):
        raise NotFound(f"Model {model_id!r} not found")
    return row


def list_models(*, session: Session, tenant: Tenant, limit: int = 50, cursor: str | None = None) -> Page[Model]:
    return _page(session, select(Model).where(Model.tenant_id == tenant.id), Model, limit=limit, cursor=cursor)


def _in_use(session: Session, column: Any, value: str) -> bool:
    return bool(session.scalar(select(exists().where(column == value, Job.state.in_(ACTIVE_STATES)))))


def delete_model(*, session: Session, tenant: Tenant, model_id: str) -> Model:
    """Deletes the row and returns it (the caller removes the stored file). 409 while an active job uses it.

    The row is locked first (PostgreSQL), so a job inserted concurrently either commits before the check sees
    it or fails its foreign-key check after the delete."""
    row = _get(session, Model, model_id, lock=True)
    if row is None or row.tenant_id != tenant.id:
        session.rollback()
        raise NotFound(f"Model {model_id!r} not found")
    if _in_use(session, Job.model_id, model_id):
        session.rollback()
        raise Conflict(f"Model {model_id!r} is used by a queued or running job")
    session.delete(row)
    session.commit()
    return row


def create_dataset(
    *,
    session: Session,
    tenant: Tenant,
    name: str,
    format: str,
    size: int,
    uri: str | None = None,
    path: str | None = None,
    sha256: str | None = None,
    num_examples: int | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    has_val: bool = False,
    id: str | None = None,
) -> Dataset:
    if (uri is None) == (path is None):
        raise ValueError("a dataset has exactly one of uri (registered) or path (uploaded)")
    row = Dataset(
        tenant_id=tenant.id,
        name=name,
        format=format,
        uri=uri,
        path=path,
        size=size,
        sha256=sha256,
        num_examples=num_examples,
        input_shape=list(input_shape) if input_shape is not None else None,
        num_classes=num_classes,
        has_val=has_val,
    )
    if id is not None:
        row.id = id
    session.add(row)
    session.commit()
    return row


def get_dataset(*, session: Session, tenant: Tenant | None, dataset_id: str) -> Dataset:
    row = _get(session, Dataset, dataset_id)
    if row is None or (tenant is not None and row.tenant_id != tenant.id):
        raise NotFound(f"Dataset {dataset_id!r} not found")
    return row


def list_datasets(*, session: Session, tenant: Tenant, limit: int = 50, cursor: str | None = None) -> Page[Dataset]:
    return _page(session, select(Dataset).where(Dataset.tenant_id == tenant.id), Dataset, limit=limit, cursor=cursor)


def delete_dataset(*, session: Session, tenant: Tenant, dataset_id: str) -> Dataset:
    row = _get(session, Dataset, dataset_id, lock=True)
    if row is None or row.tenant_id != tenant.id:
        session.rollback()
        raise NotFound(f"Dataset {dataset_id!r} not found")
    if _in_use(session, Job.dataset_id, dataset_id):
        session.rollback()
        raise Conflict(f"Dataset {dataset_id!r} is used by a queued or running job")
    session.delete(row)
    session.commit()
    return row


# --- jobs: API side ---------------------------------------------------------------------------------------


def _emit(session: Session, job_id: str, type: str, data: dict[str, Any] | None = None) -> JobEvent:
    """Appends an event in the caller's transaction; ``seq`` comes from an atomic per-job counter."""
    seq = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(event_seq=Job.event_seq + 1)
        .returning(Job.event_seq)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if seq is None:
        raise NotFound(f"Job {job_id!r} not found")
    event = JobEvent(job_id=job_id, seq=seq, type=type, data=data)
    session.add(event)
    return event


def _reload(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound(f"Job {job_id!r} not found")
    return job


def create_job(
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
) -> tuple[Job, bool]:
    """A queued job; returns ``(job, created)``.

    With an ``idempotency_key`` already used by this tenant: the same ``request_hash`` returns the existing job
    (``created=False``), a different one raises ``IdempotencyMismatch``. ``check`` (e.g. the API's preflight)
    sees the model and dataset rows of a new job before it is inserted, and raises to refuse it.
    """
    if idempotency_key is not None:
        existing = session.scalar(
            select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key)
        )
        if existing is not None:
            if existing.request_hash != request_hash:
                raise IdempotencyMismatch(
                    "This Idempotency-Key was used with a different request body",
                    errors=[{"loc": ["header", "Idempotency-Key"], "msg": "reused with a different body",
                             "type": "idempotency"}],
                )
            return existing, False

    errors = []
    model = _get(session, Model, model_id)
    if model is None or model.tenant_id != tenant.id:
        errors.append({"loc": ["body", "model_id"], "msg": f"model {model_id!r} not found", "type": "not_found"})
    dataset = _get(session, Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant.id:
        errors.append(
            {"loc": ["body", "dataset_id"], "msg": f"dataset {dataset_id!r} not found", "type": "not_found"}
        )
    if errors:
        raise InvalidInput("The job refers to unknown inputs", errors=errors)
    if check is not None:
        assert model is not None and dataset is not None
        check(model, dataset)

    job = Job(
        tenant_id=tenant.id,
        model_id=model_id,
        dataset_id=dataset_id,
        spec=spec,
        queue=queue,
        state=JobState.QUEUED,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    session.add(job)
    try:
        session.flush()
        _emit(session, job.id, "state", {"state": JobState.QUEUED.value})
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
    return _reload(session, job.id), True


def get_job(*, session: Session, tenant: Tenant | None, job_id: str) -> Job:
    """``tenant=None`` is for the worker (no scoping)."""
    job = session.get(Job, job_id, populate_existing=True) if is_id(job_id) else None
    if job is None or (tenant is not None and job.tenant_id != tenant.id):
        raise NotFound(f"Job {job_id!r} not found")
    return job


def list_jobs(
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
    return _page(session, stmt, Job, limit=limit, cursor=cursor)


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
    _emit(session, job_id, "state", event)
    session.commit()
    return True


def request_cancel(*, session: Session, tenant: Tenant | None, job_id: str) -> Job:
    """Queued → canceled at once; running → canceling (the worker stops at its next check).

    Canceling or canceled jobs are returned unchanged; finished ones raise ``Conflict``.
    """
    for _ in range(5):
        job = get_job(session=session, tenant=tenant, job_id=job_id)
        state = job.state
        if state in (JobState.CANCELING, JobState.CANCELED):
            return job
        if state in (JobState.SUCCEEDED, JobState.FAILED):
            raise Conflict(f"Job {job_id!r} already {state.value}")
        now = utcnow()
        if state is JobState.QUEUED:
            values = {"state": JobState.CANCELED, "cancel_requested": True, "finished_at": now,
                      "message": "canceled before it started"}
            new = JobState.CANCELED
        else:
            values = {"state": JobState.CANCELING, "cancel_requested": True}
            new = JobState.CANCELING
        if _transition(session, job_id, expected=state, values=values, event={"state": new.value}):
            return _reload(session, job_id)
    raise Conflict(f"Job {job_id!r} changed state concurrently; try again")


def retry_job(*, session: Session, tenant: Tenant | None, job_id: str) -> Job:
    """Failed or canceled → queued (progress is kept: the worker resumes from its checkpoint)."""
    for _ in range(5):
        job = get_job(session=session, tenant=tenant, job_id=job_id)
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
        if _transition(session, job_id, expected=state, values=values,
                       event={"state": JobState.QUEUED.value, "retry": True}):
            return _reload(session, job_id)
    raise Conflict(f"Job {job_id!r} changed state concurrently; try again")


def jobs_by_state(*, session: Session) -> dict[str, int]:
    """Counts over all tenants (for /metrics)."""
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    counts = {s.value: 0 for s in JobState}
    for state, n in rows:
        counts[JobState(state).value] = n
    return counts


# --- jobs: worker side ------------------------------------------------------------------------------------


def claim_job(
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
        cutoff = now - (stale_after if isinstance(stale_after, timedelta) else timedelta(seconds=stale_after))
        cond = or_(cond, and_(Job.state == JobState.RUNNING, Job.heartbeat_at < cutoff))
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
    job = _reload(session, job_id)
    _emit(session, job_id, "state", {"state": JobState.RUNNING.value, "attempt": job.attempts})
    session.commit()
    return _reload(session, job_id)


def _active_update(session: Session, job_id: str, values: dict[str, Any]) -> bool | None:
    """Updates a running/canceling job and returns its ``cancel_requested``; ``None`` when it is not active."""
    flag = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_([JobState.RUNNING, JobState.CANCELING]))
        .values(**values)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    return None if flag is None else bool(flag)


def progress_values(progress: float, step: int | None, sparsity: float | None, message: str | None) -> dict[str, Any]:
    """The job columns a progress report sets (it also counts as a heartbeat)."""
    values: dict[str, Any] = {"progress": min(max(float(progress), 0.0), 1.0), "heartbeat_at": utcnow()}
    extra = {"step": step, "sparsity": sparsity, "message": message}
    values.update({k: v for k, v in extra.items() if v is not None})
    return values


def terminal_values(state: JobState, error: dict[str, Any] | None, message: str | None,
                    result: dict[str, Any] | None) -> dict[str, Any]:
    """The job columns that finishing it sets; ``state`` must be terminal."""
    if state not in TERMINAL_STATES:
        raise ValueError(f"a job can only finish in a terminal state, not {state.value}")
    values: dict[str, Any] = {"state": state, "finished_at": utcnow(), "error": error}
    values.update({k: v for k, v in {"message": message, "result": result}.items() if v is not None})
    if state is JobState.SUCCEEDED:
        values["progress"] = 1.0
    return values


def state_event(state: JobState, error: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"state": state.value, **({"error": error} if error is not None else {})}


def heartbeat(*, session: Session, job_id: str) -> bool:
    """Refreshes ``heartbeat_at``; returns True when the worker should stop (cancel requested / not active)."""
    flag = _active_update(session, job_id, {"heartbeat_at": utcnow()})
    session.commit()
    return True if flag is None else flag


def update_progress(
    *,
    session: Session,
    job_id: str,
    progress: float,
    step: int | None = None,
    sparsity: float | None = None,
    message: str | None = None,
    event: bool = True,
) -> bool:
    """Records progress (0..1) and refreshes the heartbeat; appends a ``progress`` event unless ``event=False``.
    Returns True when the worker should stop (cancel requested, or the job is no longer active)."""
    values = progress_values(progress, step, sparsity, message)
    flag = _active_update(session, job_id, values)
    if flag is None:
        session.rollback()
        return True
    if event:
        _emit(session, job_id, "progress", {k: v for k, v in values.items() if k != "heartbeat_at"})
    session.commit()
    return flag


def add_metric(
    *,
    session: Session,
    job_id: str,
    step: int,
    kind: str = "prune",
    epoch: float | None = None,
    sparsity: float | None = None,
    loss: float | None = None,
    metric: float | None = None,
    seconds: float | None = None,
) -> JobMetric:
    """Adds a curve point, replacing one of the same ``(step, kind)``: a resumed run recomputes the points it
    made after its last checkpoint (identically: runs are seeded), and the curve must not hold them twice."""
    session.execute(
        delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step == step, JobMetric.kind == kind)
    )
    row = JobMetric(
        job_id=job_id, step=step, kind=kind, epoch=epoch, sparsity=sparsity, loss=loss, metric=metric, seconds=seconds
    )
    session.add(row)
    session.commit()
    return row


def add_event(*, session: Session, job_id: str, type: str, data: dict[str, Any] | None = None) -> JobEvent:
    event = _emit(session, job_id, type, data)
    session.commit()
    return event


def add_artifact(
    *,
    session: Session,
    job_id: str,
    name: str,
    path: str,
    size: int,
    sha256: str,
    kind: str = "model",
    media_type: str = "application/octet-stream",
) -> Artifact:
    """Records a stored file (``path`` is the artifact-store key). A retry replaces an artifact of the same name."""
    row = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if row is None:
        row = Artifact(job_id=job_id, name=name)
        session.add(row)
    row.kind, row.path, row.size, row.sha256, row.media_type = kind, path, size, sha256, media_type
    _emit(session, job_id, "artifact", {"name": name, "kind": kind, "size": size, "sha256": sha256})
    session.commit()
    return row


def finish_job(
    *,
    session: Session,
    job_id: str,
    state: JobState | str,
    error: dict[str, Any] | None = None,
    message: str | None = None,
    result: dict[str, Any] | None = None,
) -> Job:
    """Moves an active job to a terminal state (``error`` is a problem dict, see ``core.errors``).
    A job that is already terminal is returned unchanged."""
    state = JobState(state)
    values = terminal_values(state, error, message, result)
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(ACTIVE_STATES))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:
        _emit(session, job_id, "state", state_event(state, error))
        session.commit()
    else:
        session.rollback()
    return _reload(session, job_id)


def stale_jobs(*, session: Session, older_than: float | timedelta) -> list[Job]:
    """Running/canceling jobs whose last heartbeat (or start) is older than ``older_than`` (seconds)."""
    delta = older_than if isinstance(older_than, timedelta) else timedelta(seconds=older_than)
    cutoff: datetime = utcnow() - delta
    last = func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at)
    stmt = select(Job).where(Job.state.in_([JobState.RUNNING, JobState.CANCELING]), last < cutoff)
    return list(session.scalars(stmt.order_by(Job.id)))


# --- job outputs ------------------------------------------------------------------------------------------


def list_metrics(*, session: Session, job_id: str) -> list[JobMetric]:
    return list(session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.id)))


def list_events(*, session: Session, job_id: str, after_seq: int = 0, limit: int = 100) -> list[JobEvent]:
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
    return list(session.scalars(stmt.order_by(JobEvent.seq).limit(limit)))


def list_artifacts(*, session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(*, session: Session, job_id: str, name: str) -> Artifact:
    if "\x00" in name or len(name) > 255:
        raise NotFound(f"Artifact {name[:64]!r} not found")
    row = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if row is None:
        raise NotFound(f"Artifact {name!r} not found")
    return row
