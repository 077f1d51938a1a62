"""Bursts of concurrent clients against the real server (uvicorn on SQLite and on PostgreSQL).

``N`` clients at once per request kind (list models, create a job, open an event stream, the status poll, the
liveness probe), then all kinds together, from a process of their own (``tests/_burst.py``: what every burst must
satisfy, at any concurrency: no 500, each answer a 2xx or a 503 problem+json with Retry-After within a bound, the
liveness probe and the status poll answered within ~2 s meanwhile). Here also: a job exists for each 202 and for
nothing else; event streams that wait for news hold no pooled connection (at most the few a poll takes for a
moment); and a job whose client gave up waiting before its turn came is not created.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from _api_testkit import assert_problem
from _burst import KINDS, N, check_burst, run_burst
from core.service.db.tables import Job


def _job_count(server, tenant_id: str) -> int:
    with server.session() as s:
        return s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id))


@pytest.fixture
def job(make_account, seed):
    """An account with a model, a dataset and a queued job (followed by the streams, polled by the probe)."""
    owner = make_account()
    model_id, dataset_id = seed(owner.tenant)
    body = {"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}}
    resp = owner.client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    return owner, body, resp.json()["id"]


@pytest.mark.parametrize("kinds", [(k,) for k in KINDS] + [KINDS], ids=[*KINDS, "all"])
def test_burst_answers_fast_and_never_500(server, job, kinds):
    owner, body, job_id = job
    jobs_before = _job_count(server, owner.tenant.id)
    engine = server.sessionmaker.kw["bind"]
    burst = run_burst(server.base_url, owner.key, kinds, body, job_id, engine)
    print(f"\n[{server.db}] {burst.summary()}")

    check_burst(burst)
    if len(kinds) == 1:  # saturation turns some away (503), but a burst of one kind is served, not refused
        assert burst.served(kinds[0]) >= N // 4, burst.summary()
    else:  # all kinds at once: more than the server can do within the wait, but not refused wholesale
        assert sum(burst.served(k) for k in kinds) >= N, burst.summary()
    assert _job_count(server, owner.tenant.id) - jobs_before == burst.created()
    if burst.served("events") >= N // 4:  # (all at once, most streams may have been turned away)
        assert burst.pool_while_streaming, "no sample taken while the streams were open"
        # a stream's poll holds a connection for a moment, and the streams together a quarter of the pool at most;
        # the probe's status poll may hold one more (on SQLite the read engine shares the pool)
        limit = server.settings.db_pool_size // 4 + 1
        assert max(burst.pool_while_streaming) <= limit, burst.summary()


def _lock_job_inserts(server) -> tuple[Any, Any]:
    """A connection that holds what a job's insert waits for: PostgreSQL's jobs table, SQLite's write lock."""
    engine = server.sessionmaker.kw["bind"]
    conn = engine.connect()
    if server.db == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        tx = conn.begin()
        conn.execute(text("LOCK TABLE jobs IN EXCLUSIVE MODE"))
        return conn, tx
    return conn, None


def test_no_job_for_a_client_that_gave_up_waiting(server, job):
    """The database's slots are all taken by job creations stuck on a lock; one more client gives up while it
    waits for a slot. Its request is served later (the lock goes): it must not create a job for nobody."""
    owner, body, _ = job
    blockers = server.settings.db_pool_size
    jobs_before = _job_count(server, owner.tenant.id)
    conn, tx = _lock_job_inserts(server)
    stuck: list[httpx.Response] = []
    try:
        threads = [
            threading.Thread(target=lambda: stuck.append(owner.client.post("/v1/jobs", json=body)))
            for _ in range(blockers)
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)  # every slot is taken, by a request waiting for the lock
        with pytest.raises(httpx.TimeoutException):  # the client gives up before its turn
            owner.client.post("/v1/jobs", json=body, timeout=0.3)
        time.sleep(0.2)
    finally:
        if tx is not None:
            tx.rollback()
        else:
            conn.exec_driver_sql("ROLLBACK")
        conn.close()
    for t in threads:
        t.join(timeout=30)
    assert sorted(r.status_code for r in stuck) == [202] * blockers
    time.sleep(1.0)  # the abandoned request has its turn now
    assert _job_count(server, owner.tenant.id) - jobs_before == blockers


def test_a_pool_held_elsewhere_is_a_503_within_the_wait(server, account):
    """Every connection of the pool is taken by something the gate does not count (here: the test itself). A
    request then waits the pool's timeout (``db_wait_timeout_s``), not SQLAlchemy's 30 s, and is a 503 with
    Retry-After, not a 500."""
    engine = server.sessionmaker.kw["bind"]
    held = [engine.connect() for _ in range(server.settings.db_pool_size + server.settings.db_max_overflow)]
    try:
        start = time.perf_counter()
        resp = account.client.get("/v1/models")
        elapsed = time.perf_counter() - start
    finally:
        for conn in held:
            conn.close()
    body = assert_problem(resp, 503, "service-unavailable")
    assert int(resp.headers["retry-after"]) > 0, body
    assert server.settings.db_wait_timeout_s <= elapsed <= server.settings.db_wait_timeout_s + 3, elapsed
    assert account.client.get("/v1/models").status_code == 200  # the connections are back: served again
