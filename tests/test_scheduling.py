"""Fair scheduling between tenants (issue #19), on SQLite and PostgreSQL: ``core.service.db.scheduling`` is what
both the embedded worker's poll and every Celery turn (``worker.turns``) ask for the next job."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from _pg import DATABASES, empty_database
from core.service.db import inputs, migrate, scheduling, tenants
from core.service.db.base import make_engine, make_sessionmaker, utcnow
from core.service.db.tables import Job, JobState, Tenant


@pytest.fixture(scope="module", params=DATABASES)
def sessions(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[sessionmaker]:
    with empty_database(request.param, tmp_path_factory.mktemp(request.param)) as url:
        migrate.upgrade(url)
        engine = make_engine(url)
        try:
            yield make_sessionmaker(engine)
        finally:
            engine.dispose()


@pytest.fixture(autouse=True)
def _empty_queue(sessions: sessionmaker) -> None:
    """Each test sees only its own jobs: earlier tests' are finished."""
    with sessions() as s:
        s.execute(update(Job).values(state=JobState.SUCCEEDED))
        s.commit()


def _tenant(s: Session, prefix: str) -> Tenant:
    return tenants.get_or_create_tenant(session=s, name=f"{prefix}-{uuid.uuid4().hex[:8]}")


def _jobs(s: Session, tenant: Tenant, n: int, *, priority: int = 0, queue: str = "cpu") -> list[str]:
    model = inputs.create_model(
        session=s, tenant=tenant, name="m", format="safetensors", size=0, sha256="0" * 64, path="models/m.safetensors"
    )
    dataset = inputs.create_dataset(
        session=s, tenant=tenant, name="d", format="npz", size=0, sha256=None, path=None, uri="file:///d.npz"
    )
    ids = []
    for _ in range(n):
        job = Job(
            tenant_id=tenant.id, model_id=model.id, dataset_id=dataset.id, spec={}, queue=queue, priority=priority
        )
        s.add(job)
        s.commit()
        ids.append(job.id)
    return ids


def _start(s: Session, job_id: str, *, ago_s: float = 0.0) -> None:
    started = utcnow() - timedelta(seconds=ago_s)
    s.execute(update(Job).where(Job.id == job_id).values(state=JobState.RUNNING, started_at=started))
    s.commit()


def _finish(s: Session, job_id: str) -> None:
    s.execute(update(Job).where(Job.id == job_id).values(state=JobState.SUCCEEDED))
    s.commit()


def test_a_late_tenant_is_not_held_up_by_an_earlier_tenants_queue(sessions: sessionmaker) -> None:
    """Tenant A queues 5 jobs, then B 1; one worker runs them one at a time: B's runs second, not sixth."""
    with sessions() as s:
        a_jobs = _jobs(s, _tenant(s, "a"), 5)
        (b_job,) = _jobs(s, _tenant(s, "b"), 1)
        order = []
        while (next_id := scheduling.pick(session=s, queue="cpu")) is not None:
            order.append(next_id)
            _start(s, next_id)
            _finish(s, next_id)
    assert sorted(order) == sorted([*a_jobs, b_job]) and len(order) == 6  # every job once
    assert order.index(b_job) == 1, order
    assert [j for j in order if j != b_job] == a_jobs  # A's in their order


def test_tenants_take_turns_in_one_poll(sessions: sessionmaker) -> None:
    with sessions() as s:
        a = _jobs(s, _tenant(s, "a"), 4)
        b = _jobs(s, _tenant(s, "b"), 2)
        c = _jobs(s, _tenant(s, "c"), 1)
        order = scheduling.fair_queued(session=s, queues=["cpu"], limit=10)
    assert order == [a[0], b[0], c[0], a[1], b[1], a[2], a[3]], order


def test_the_tenant_with_fewer_running_jobs_goes_first(sessions: sessionmaker) -> None:
    with sessions() as s:
        a = _jobs(s, _tenant(s, "a"), 3)
        b = _jobs(s, _tenant(s, "b"), 3)
        _start(s, b[0])  # B runs one already
        _start(s, a[0], ago_s=60)
        _start(s, a[1], ago_s=30)  # A runs two
        assert scheduling.pick(session=s, queue="cpu") == b[1]
        _finish(s, a[0])
        _finish(s, a[1])  # now A runs none: its turn
        assert scheduling.pick(session=s, queue="cpu") == a[2]


def test_priority_orders_a_tenants_own_jobs_only(sessions: sessionmaker) -> None:
    with sessions() as s:
        ta, tb = _tenant(s, "a"), _tenant(s, "b")
        a_low = _jobs(s, ta, 2)
        b_low = _jobs(s, tb, 1)
        (a_high,) = _jobs(s, ta, 1, priority=10)
        order = scheduling.fair_queued(session=s, queues=["cpu"], limit=10)
    # A's urgent job jumps A's queue, not B's turn.
    assert order == [a_high, b_low[0], *a_low], order


def test_a_tenant_at_its_running_limit_is_passed_over(sessions: sessionmaker) -> None:
    with sessions() as s:
        ta, tb = _tenant(s, "a"), _tenant(s, "b")
        a = _jobs(s, ta, 3)
        b = _jobs(s, tb, 1)
        _start(s, a[0])
        caps = {ta.name: 1}
        assert scheduling.fair_queued(session=s, queues=["cpu"], limit=10, caps=caps) == [b[0]]
        _start(s, b[0])
        assert scheduling.pick(session=s, queue="cpu", caps=caps) is None  # A waits, B has nothing queued
        assert scheduling.pick(session=s, queue="cpu", default_cap=2) == a[1]  # a default of 2 lets A run one more
        assert scheduling.fair_queued(session=s, queues=["cpu"], limit=10, default_cap=2) == [a[1]]


def test_queues_and_canceled_jobs(sessions: sessionmaker) -> None:
    with sessions() as s:
        t = _tenant(s, "a")
        cpu = _jobs(s, t, 1)
        gpu = _jobs(s, t, 1, queue="gpu")
        s.execute(update(Job).where(Job.id == cpu[0]).values(cancel_requested=True))
        s.commit()
        assert scheduling.pick(session=s, queue="cpu") is None
        assert scheduling.pick(session=s, queue="gpu") == gpu[0]
