"""Which queued job runs next: fair between tenants, by priority within one.

Tenants take turns: the next job is the head of the tenant with the fewest jobs running now, ties broken by the
tenant whose last job started longest ago (a tenant that never ran one first). Within a tenant, its queued jobs go
by ``priority`` (higher first), then age. A tenant at its ``running_jobs`` limit is passed over. So a tenant
that queued a hundred jobs does not hold up one that queues a single job after them: that one starts as soon as a
worker frees up. Both schedulers use it: the embedded worker's poll, and every Celery worker when a message
arrives (``pick``: a message is a turn to run the fairest queued job of its queue, not necessarily its own).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.service.db.tables import Job, JobState, Tenant

RUNNING = (JobState.RUNNING, JobState.CANCELING)


def fair_queued(
    *,
    session: Session,
    queues: Collection[str] | None = None,
    exclude: Sequence[str] = (),
    limit: int = 10,
    default_cap: int | None = None,
    caps: dict[str, int | None] | None = None,
) -> list[str]:
    """Up to ``limit`` queued job ids in the order they should start. ``default_cap`` and ``caps`` (by tenant name)
    are the tenants' ``running_jobs`` limits (``core.service.limits.running_caps``)."""
    order = (Job.priority.desc(), Job.created_at, Job.id)
    rank = func.row_number().over(partition_by=Job.tenant_id, order_by=order).label("rank")
    inner = select(Job.id, Job.tenant_id, Job.created_at, rank).where(
        Job.state == JobState.QUEUED, Job.cancel_requested.is_(False)
    )
    if queues is not None:
        inner = inner.where(Job.queue.in_(list(queues)))
    if exclude:
        inner = inner.where(Job.id.not_in(list(exclude)))
    sub = inner.subquery()
    heads: dict[str, list[str]] = {}
    oldest: dict[str, float] = {}
    for job_id, tenant_id, created_at, _ in session.execute(
        select(sub.c.id, sub.c.tenant_id, sub.c.created_at, sub.c.rank)
        .where(sub.c.rank <= limit)
        .order_by(sub.c.tenant_id, sub.c.rank)
    ):
        heads.setdefault(tenant_id, []).append(job_id)
        oldest[tenant_id] = min(oldest.get(tenant_id, math.inf), created_at.timestamp())
    if not heads:
        session.rollback()
        return []
    tenants = list(heads)
    running = dict(
        session.execute(
            select(Job.tenant_id, func.count())
            .where(Job.tenant_id.in_(tenants), Job.state.in_(RUNNING))
            .group_by(Job.tenant_id)
        ).all()
    )
    last = {
        t: (s.timestamp() if s is not None else -math.inf)
        for t, s in session.execute(
            select(Job.tenant_id, func.max(Job.started_at)).where(Job.tenant_id.in_(tenants)).group_by(Job.tenant_id)
        )
    }
    cap_of: dict[str, int | None] = {t: default_cap for t in tenants}
    if caps:
        for tenant_id, name in session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(tenants))):
            if name in caps:
                cap_of[tenant_id] = caps[name]
    session.rollback()

    picked: list[str] = []
    turn = max([v for v in last.values() if v != -math.inf], default=0.0)
    load = {t: int(running.get(t, 0)) for t in tenants}
    while len(picked) < limit:
        ready = [t for t in tenants if heads[t] and (cap_of[t] is None or load[t] < cap_of[t])]  # type: ignore[operator]
        if not ready:
            break
        tenant = min(ready, key=lambda t: (load[t], last.get(t, -math.inf), oldest[t], t))
        picked.append(heads[tenant].pop(0))
        load[tenant] += 1
        turn += 1.0
        last[tenant] = turn  # it just had its turn: the others come first at equal load
    return picked


def pick(
    *,
    session: Session,
    queue: str,
    default_cap: int | None = None,
    caps: dict[str, int | None] | None = None,
) -> str | None:
    """The queued job of ``queue`` that should start next, or ``None`` (nothing queued, or every tenant with
    queued jobs at its running limit)."""
    ids = fair_queued(session=session, queues=[queue], limit=1, default_cap=default_cap, caps=caps)
    return ids[0] if ids else None


def has_queued(*, session: Session, queue: str) -> bool:
    """Whether any job waits in ``queue`` (whichever tenant, at its limit or not)."""
    found = session.scalar(
        select(Job.id).where(Job.state == JobState.QUEUED, Job.cancel_requested.is_(False), Job.queue == queue).limit(1)
    )
    session.rollback()
    return found is not None
