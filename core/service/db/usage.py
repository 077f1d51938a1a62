"""What each tenant holds: running and queued jobs, stored bytes; and the admission checks against its limits.

Stored bytes are what the tenant's rows say it keeps in the artifact store: uploaded models and datasets, and its
jobs' outputs (a registered dataset URI is not counted: it is not in the store). The checks run inside the writing
transaction, after the tenant's row is locked (PostgreSQL) or the write lock taken (SQLite), so that concurrent
requests of one tenant are admitted one at a time: nothing is created beyond a limit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.errors import QuotaExceeded
from core.service.db.base import begin_write
from core.service.db.tables import Artifact, Dataset, Job, JobState, Model, Tenant
from core.service.limits import TenantLimits

RUNNING = (JobState.RUNNING, JobState.CANCELING)
#: seconds a client is told to wait when a job or byte limit refuses it (jobs finish, space is freed)
RETRY_AFTER_S = 30


@dataclass(frozen=True)
class Usage:
    running_jobs: int
    queued_jobs: int
    stored_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _stored_bytes(session: Session, tenant_ids: list[str] | None) -> dict[str, int]:
    totals: dict[str, int] = {}
    queries = [
        select(Model.tenant_id, func.coalesce(func.sum(Model.size), 0)).group_by(Model.tenant_id),
        select(Dataset.tenant_id, func.coalesce(func.sum(Dataset.size), 0))
        .where(Dataset.path.is_not(None))
        .group_by(Dataset.tenant_id),
        select(Job.tenant_id, func.coalesce(func.sum(Artifact.size), 0))
        .join(Artifact, Artifact.job_id == Job.id)
        .group_by(Job.tenant_id),
    ]
    for query in queries:
        if tenant_ids is not None:
            query = query.where(query.selected_columns[0].in_(tenant_ids))
        for tenant_id, size in session.execute(query):
            totals[tenant_id] = totals.get(tenant_id, 0) + int(size)
    return totals


def usage_by_tenant(*, session: Session, tenant_ids: list[str] | None = None) -> dict[str, Usage]:
    """Usage of the given tenants (all with a job or a stored byte when ``None``), by tenant id."""
    jobs_q = select(Job.tenant_id, Job.state, func.count()).where(Job.state.in_([*RUNNING, JobState.QUEUED]))
    if tenant_ids is not None:
        jobs_q = jobs_q.where(Job.tenant_id.in_(tenant_ids))
    running: dict[str, int] = {}
    queued: dict[str, int] = {}
    for tenant_id, state, n in session.execute(jobs_q.group_by(Job.tenant_id, Job.state)):
        target = queued if state is JobState.QUEUED else running
        target[tenant_id] = target.get(tenant_id, 0) + int(n)
    stored = _stored_bytes(session, tenant_ids)
    ids = set(tenant_ids) if tenant_ids is not None else set(running) | set(queued) | set(stored)
    return {t: Usage(running.get(t, 0), queued.get(t, 0), stored.get(t, 0)) for t in ids}


def usage(*, session: Session, tenant: Tenant) -> Usage:
    return usage_by_tenant(session=session, tenant_ids=[tenant.id])[tenant.id]


def lock_tenant(session: Session, tenant: Tenant) -> None:
    """Serialises this tenant's admissions until the transaction ends: the write lock (SQLite) or the tenant's row
    (PostgreSQL, ``FOR UPDATE``)."""
    begin_write(session)
    if session.connection().dialect.name != "sqlite":
        session.execute(select(Tenant.id).where(Tenant.id == tenant.id).with_for_update())


def _refuse(detail: str, name: str, value: int | float, used: int | float) -> QuotaExceeded:
    return QuotaExceeded(detail, limit={"name": name, "value": value, "used": used}, retry_after_s=RETRY_AFTER_S)


def admit_job(*, session: Session, tenant: Tenant, limits: TenantLimits) -> None:
    """Raises ``QuotaExceeded`` if one more queued job would pass the tenant's ``queued_jobs`` limit (call it in
    the creating transaction, after ``lock_tenant``)."""
    if limits.queued_jobs is None:
        return
    queued = int(
        session.scalar(select(func.count()).where(Job.tenant_id == tenant.id, Job.state == JobState.QUEUED)) or 0
    )
    if queued >= limits.queued_jobs:
        raise _refuse(
            f"tenant {tenant.name!r} has {queued} queued jobs, its limit is {limits.queued_jobs}: wait for some to "
            "start, or cancel some",
            "queued_jobs",
            limits.queued_jobs,
            queued,
        )


def admit_bytes(*, session: Session, tenant: Tenant, limits: TenantLimits, incoming: int) -> None:
    """Raises ``QuotaExceeded`` if ``incoming`` more stored bytes would pass the tenant's ``stored_bytes`` limit."""
    if limits.stored_bytes is None:
        return
    used = _stored_bytes(session, [tenant.id]).get(tenant.id, 0)
    if used + incoming > limits.stored_bytes:
        raise _refuse(
            f"tenant {tenant.name!r} stores {used} bytes, its limit is {limits.stored_bytes}"
            + (f" ({incoming} more were sent)" if incoming else "")
            + ": delete models, datasets or jobs to free space",
            "stored_bytes",
            limits.stored_bytes,
            used,
        )


def describe(limits: TenantLimits, used: Usage) -> dict[str, Any]:
    """Each limit with its value (``None``: no limit) and the current use, as ``GET /v1/usage`` returns them."""
    return {
        "running_jobs": {"limit": limits.running_jobs, "used": used.running_jobs},
        "queued_jobs": {"limit": limits.queued_jobs, "used": used.queued_jobs},
        "stored_bytes": {"limit": limits.stored_bytes, "used": used.stored_bytes},
        "requests_per_s": {"limit": limits.requests_per_s},
    }
