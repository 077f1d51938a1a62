"""The data functions (``core.service.db``: jobs, attempts, outputs), called directly on the real database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from core.errors import Conflict, IdempotencyMismatch, NotFound
from core.service.db import attempts, jobs, outputs
from core.service.db.base import read_retrying, utcnow
from core.service.db.tables import Job, JobState


@pytest.fixture
def job(server, account, seed):
    model_id, dataset_id = seed()
    with server.session() as s:
        job, created = jobs.create(
            session=s,
            tenant=account.tenant,
            model_id=model_id,
            dataset_id=dataset_id,
            spec={"sparsity": 0.5},
            idempotency_key="k",
            request_hash="h",
        )
        assert created
        return job


def test_create_job_idempotency(server, account, job):
    with server.session() as s:
        again, created = jobs.create(
            session=s,
            tenant=account.tenant,
            model_id=job.model_id,
            dataset_id=job.dataset_id,
            spec={},
            idempotency_key="k",
            request_hash="h",
        )
        assert not created and again.id == job.id
        with pytest.raises(IdempotencyMismatch):
            jobs.create(
                session=s,
                tenant=account.tenant,
                model_id=job.model_id,
                dataset_id=job.dataset_id,
                spec={},
                idempotency_key="k",
                request_hash="other",
            )


def test_claim_is_exclusive_and_counts_attempts(server, job):
    with server.session() as s1, server.session() as s2:
        first = attempts.claim(session=s1, job_id=job.id, task_id="t", worker="w1")
        second = attempts.claim(session=s2, job_id=job.id, worker="w2")
    assert first is not None and first.state is JobState.RUNNING and first.attempts == 1
    assert first.worker == "w1" and first.task_id == "t" and first.started_at and first.heartbeat_at
    assert second is None
    with server.session() as s:
        assert attempts.claim(session=s, job_id="job_missing") is None


def test_progress_heartbeat_and_cancel_signal(server, account, job):
    """Each returns ``(owned, cancel_requested)`` for the attempt; one that does not own the job writes nothing."""
    with server.session() as s:
        assert attempts.write_progress(session=s, job_id=job.id, attempt=0, progress=0.5) == (False, False)  # queued
        assert attempts.claim(session=s, job_id=job.id).attempts == 1
        assert attempts.write_progress(
            session=s, job_id=job.id, attempt=1, progress=1.7, step=3, sparsity=0.4, message="pruning"
        ) == (True, False)
        j = jobs.get(session=s, tenant=account.tenant, job_id=job.id)
        assert (j.progress, j.step, j.sparsity, j.message) == (1.0, 3, 0.4, "pruning")
        assert attempts.heartbeat(session=s, job_id=job.id, attempt=1) == (True, False)
        assert attempts.control(session=s, job_id=job.id, attempt=1) == (True, False)
        jobs.cancel(session=s, tenant=account.tenant, job_id=job.id)
        assert attempts.heartbeat(session=s, job_id=job.id, attempt=1) == (True, True)
        assert attempts.control(session=s, job_id=job.id, attempt=1) == (True, True)
        assert attempts.write_progress(session=s, job_id=job.id, attempt=1, progress=0.6, event=False) == (True, True)
        assert attempts.heartbeat(session=s, job_id=job.id, attempt=2) == (False, False)  # another attempt's job
        assert attempts.write_progress(session=s, job_id=job.id, attempt=2, progress=0.9) == (False, False)
        assert jobs.get(session=s, tenant=account.tenant, job_id=job.id).progress == 0.6
        events = outputs.list_events(session=s, job_id=job.id)
        assert [e.type for e in events] == ["state", "state", "progress", "state"]
        assert [e.seq for e in events] == [1, 2, 3, 4]
        assert outputs.list_events(session=s, job_id=job.id, after_seq=2, limit=1)[0].seq == 3


def test_stale_jobs_and_reclaim(server, job):
    with server.session() as s:
        attempts.claim(session=s, job_id=job.id)
        assert job.id not in {j.id for j in attempts.stale_jobs(session=s, older_than=60)}
        s.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=utcnow() - timedelta(minutes=10)))
        s.commit()
        assert job.id in {j.id for j in attempts.stale_jobs(session=s, older_than=timedelta(minutes=5))}
        assert attempts.claim(session=s, job_id=job.id) is None  # running, and no stale_after given
        again = attempts.claim(session=s, job_id=job.id, stale_after=300)
        assert again is not None and again.attempts == 2
        assert job.id not in {j.id for j in attempts.stale_jobs(session=s, older_than=60)}


def test_finish_is_terminal_once(server, account, job):
    with server.session() as s:
        attempts.claim(session=s, job_id=job.id)
        done = jobs.finish(session=s, job_id=job.id, state="succeeded", result={"accuracy": 0.9})
        assert done.state is JobState.SUCCEEDED and done.progress == 1.0 and done.finished_at
        assert done.result == {"accuracy": 0.9}
        late = jobs.finish(session=s, job_id=job.id, state=JobState.FAILED, error={"title": "late"})
        assert late.state is JobState.SUCCEEDED and late.error is None
        with pytest.raises(ValueError):
            jobs.finish(session=s, job_id=job.id, state=JobState.RUNNING)
        with pytest.raises(Conflict):
            jobs.cancel(session=s, tenant=account.tenant, job_id=job.id)
        assert jobs.counts_by_state(session=s)["succeeded"] >= 1


def test_artifacts_replace_by_name(server, job):
    with server.session() as s:
        outputs.add_artifact(session=s, job_id=job.id, name="m.safetensors", path="a", size=1, sha256="1" * 64)
        outputs.add_artifact(session=s, job_id=job.id, name="m.safetensors", path="b", size=2, sha256="2" * 64)
        arts = outputs.list_artifacts(session=s, job_id=job.id)
        assert [(a.path, a.size) for a in arts] == [("b", 2)]
        with pytest.raises(NotFound):
            outputs.get_artifact(session=s, job_id=job.id, name="nope")


def test_another_tenants_job_is_not_found(server, job, make_account):
    other = make_account().tenant
    with server.session() as s:
        for call in (jobs.get, jobs.cancel, jobs.retry):
            with pytest.raises(NotFound):
                call(session=s, tenant=other, job_id=job.id)
        assert jobs.get_unscoped(session=s, job_id=job.id).state is JobState.QUEUED


def test_status_poll_rides_over_dropped_read_connections(server, account, job, db_url):
    """The read engine pings nothing at checkout; a connection the server dropped (a restart, a failover: here
    pg_terminate_backend) costs one retry inside the request, not an error."""
    if server.db != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has no server to drop connections")
    assert account.client.get(f"/v1/jobs/{job.id}").status_code == 200  # a pooled read connection now exists
    killer = create_engine(db_url, poolclass=NullPool)
    try:
        with killer.connect() as conn:
            killed = conn.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'arborist-read' AND datname = current_database()"
                )
            )
    finally:
        killer.dispose()
    assert killed >= 1
    for _ in range(3):
        resp = account.client.get(f"/v1/jobs/{job.id}")
        assert resp.status_code == 200 and resp.json()["id"] == job.id, resp.text


def test_read_retrying_repeats_only_a_read_that_lost_its_connection(server):
    engine = create_engine(server.settings.database_url, poolclass=NullPool)
    calls = []

    def broken(conn):
        calls.append(conn)
        conn.execute(text("SELECT no_such_column FROM jobs"))

    try:
        with pytest.raises(DBAPIError) as err:
            read_retrying(engine, broken)
        assert not err.value.connection_invalidated and len(calls) == 1
    finally:
        engine.dispose()
