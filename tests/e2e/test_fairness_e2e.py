"""Fair scheduling between tenants, end to end (issue #19), on both stacks: uvicorn and one worker that runs one
job at a time (a ``celery worker -c 1``, or the embedded worker with ``--concurrency 1``), real PostgreSQL (a
schema per test) and, for Celery, real Redis.

Tenant A queues 5 jobs, then tenant B queues 1, before the worker starts: B's job runs second, right after A's
first, not after A's queue drains (global FIFO would run it sixth). Tenant limits on the same stacks: a running
limit of 1 keeps a tenant's second job queued while its first runs, and another tenant's job starts meanwhile.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from _e2e_kit import (
    HEARTBEAT_TIMEOUT_S,
    REAPER_INTERVAL_S,
    Api,
    ApiServer,
    DigitsFiles,
    Proc,
    base_env,
    create_key,
    start_celery_worker,
)
from _pg import migrated_schema
from _redis import flushed_db

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_URL = os.environ.get("ARBORIST_TEST_FAIRNESS_REDIS_URL", "redis://127.0.0.1:6379/8")  # db 8: this module
#: a quick job (no gradients, no ONNX export), so that six run in a minute
SPEC = {"method": "magnitude", "sparsity": 0.5, "device": "cpu", "seed": 0, "export": {"onnx": False}}


@pytest.fixture(params=["celery", "embedded"])
def stack(
    request: pytest.FixtureRequest, tmp_path: Path, processes: list[Proc]
) -> Iterator[tuple[str, dict[str, str], Callable[[], Proc]]]:
    """``(pg url, env, start the worker)`` for one stack; the worker is not started yet."""
    mode = request.param
    with migrated_schema("arb_fair") as url, flushed_db(REDIS_URL):
        settings = dict(
            environment="dev",
            database_url=url,
            artifact_root=str(tmp_path / "artifacts"),
            data_allowed_roots=[str(tmp_path / "datasets")],
            heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
            reaper_interval_s=REAPER_INTERVAL_S,
            tenant_running_jobs=1,  # every tenant: one job at a time (the worker runs one anyway)
        )
        if mode == "celery":
            env = base_env(**settings, broker_url=REDIS_URL, queue_backend="celery")
        else:
            env = base_env(**settings, queue_backend="embedded")

        def start_worker() -> Proc:
            if mode == "celery":
                return start_celery_worker(f"fair-{uuid.uuid4().hex[:6]}", env, tmp_path, processes)
            cmd = [sys.executable, "-m", "worker.embedded", "--concurrency", "1", "--poll-interval", "0.2"]
            return Proc("embedded worker", cmd, env, tmp_path / "embedded.log").start()

        yield url, env, start_worker


def _client(base: str, pg_url: str, tenant: str) -> httpx.Client:
    key = create_key(pg_url, f"{tenant}-{uuid.uuid4().hex[:6]}")
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_a_late_tenant_runs_before_an_earlier_tenants_queue_drains(
    stack: tuple[str, dict[str, str], Callable[[], Proc]],
    digits_files: DigitsFiles,
    tmp_path: Path,
    processes: list[Proc],
) -> None:
    pg_url, env, start_worker = stack
    server = ApiServer(env, tmp_path, processes, name="fair", log_level="warning").start()
    with _client(server.base, pg_url, "a") as ca, _client(server.base, pg_url, "b") as cb:
        a, b = Api(ca, lambda: server.proc.describe() if server.proc else ""), Api(cb)
        model_a, data_a = a.upload(digits_files)
        model_b, data_b = b.upload(digits_files)
        a_jobs = [a.submit(model_a, data_a, SPEC)["id"] for _ in range(5)]
        b_job = b.submit(model_b, data_b, SPEC)["id"]
        assert all(a.job(j)["queue_position"] is not None for j in a_jobs)
        worker = start_worker()
        a.diagnostics = lambda: worker.describe()
        done = b.wait_state(b_job, {"succeeded", "failed", "canceled"}, timeout=240)
        assert done["state"] == "succeeded", done
        a_done = [a.wait_state(j, {"succeeded", "failed", "canceled"}, timeout=240) for j in a_jobs]
        assert [j["state"] for j in a_done] == ["succeeded"] * 5
        started = sorted([(j["started_at"], j["id"]) for j in [*a_done, done]])
        order = [job_id for _, job_id in started]
        assert order.index(b_job) == 1, order  # right after A's first: global FIFO would make it sixth
        assert [j for j in order if j != b_job] == a_jobs
        usage = a.client.get("/v1/usage").json()
        assert usage["running_jobs"] == {"limit": 1, "used": 0} and usage["queued_jobs"]["used"] == 0
    worker.stop()
    server.proc.stop() if server.proc else None


def test_running_limit_keeps_a_tenants_second_job_waiting(
    stack: tuple[str, dict[str, str], Callable[[], Proc]],
    digits_files: DigitsFiles,
    tmp_path: Path,
    processes: list[Proc],
) -> None:
    """With a running limit of 1 and workers that could run two jobs at once (two Celery processes, or the
    embedded worker's --concurrency 2), a tenant's second job waits until its first has finished; another
    tenant's job goes before it."""
    pg_url, env, _ = stack
    server = ApiServer(env, tmp_path, processes, name="cap", log_level="warning").start()
    slow = {**SPEC, "method": "woodfisher", "finetune": {"epochs": 6, "batch_size": 2}, "fisher": {"samples": 64}}
    with _client(server.base, pg_url, "a") as ca, _client(server.base, pg_url, "b") as cb:
        a, b = Api(ca), Api(cb)
        model_a, data_a = a.upload(digits_files)
        model_b, data_b = b.upload(digits_files)
        first, second = (a.submit(model_a, data_a, slow)["id"] for _ in range(2))
        b_job = b.submit(model_b, data_b, SPEC)["id"]
        if env.get("ARBORIST_QUEUE_BACKEND") == "celery":
            workers = [start_celery_worker(f"cap{i}-{uuid.uuid4().hex[:4]}", env, tmp_path, processes) for i in (1, 2)]
        else:
            cmd = [sys.executable, "-m", "worker.embedded", "--concurrency", "2", "--poll-interval", "0.2"]
            workers = [Proc("embedded worker", cmd, env, tmp_path / "embedded-cap.log").start()]
        done = b.wait_state(b_job, {"succeeded", "failed"}, timeout=240)
        assert done["state"] == "succeeded", done
        ends = [a.wait_state(j, {"succeeded", "failed"}, timeout=300) for j in (first, second)]
        assert [j["state"] for j in ends] == ["succeeded", "succeeded"], ends
        # A's second job started only once its first had finished (never two of A's at once), and B's job, which
        # the free slot could take meanwhile, started before it.
        assert ends[1]["started_at"] >= ends[0]["finished_at"], ends
        assert done["started_at"] < ends[1]["started_at"], (done, ends)
    for w in workers:
        w.stop()
    server.proc.stop() if server.proc else None
