"""A Redis restart without persistence, end to end (a private ``redis-server``: the shared one is not touched).

Job A runs while Redis restarts; job B waits in the queue and its message is lost with Redis's data. A still
finishes (its state lives in SQL), and the reaper notices that Redis lost its data and sends B again.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy.orm import Session

from _e2e_kit import Api, DigitsFiles, Proc, base_env, free_port, job_spec, wait_for
from core.runs.spec import PruneSpec
from core.service.db import inputs, jobs, outputs
from core.service.db.base import make_engine, make_sessionmaker
from core.service.db.tables import Model, Tenant
from core.service.queue.celery import BROKER_MARKER, CeleryQueue
from core.service.settings import Settings


class PrivateRedis:
    def __init__(self, directory: Path, processes: list[Proc]):
        self.port, self.directory, self.processes = free_port(), directory, processes
        self.proc: Proc | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = Proc(
            f"redis:{self.port}",
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            base_env(),
            self.directory / "redis.log",
        ).start()
        self.processes.append(self.proc)
        client = self.client()
        wait_for(client.ping, timeout=20, what="redis-server to start", on_timeout=self.proc.describe)
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.stop(grace=0)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=2)


@pytest.fixture
def private_redis(tmp_path: Path, processes: list[Proc]) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path, processes)
    server.start()
    yield server
    if server.proc is not None:
        server.proc.stop(grace=0)


def _create_job(sessions: Callable[[], Session], model_id: str, dataset_id: str, spec: dict) -> str:
    """What ``POST /v1/jobs`` does before it enqueues (the API under test talks to the shared Redis)."""
    with sessions() as s:
        tenant = s.get(Tenant, inputs.get_unscoped(Model, session=s, id=model_id).tenant_id)
        spec_json = PruneSpec.model_validate(spec).model_dump(mode="json", by_alias=True)
        job, _ = jobs.create(session=s, tenant=tenant, model_id=model_id, dataset_id=dataset_id, spec=spec_json)
        return job.id


def test_redis_restart_loses_no_job(
    api: Api,
    digits_files: DigitsFiles,
    pg_url: str,
    private_redis: PrivateRedis,
    start_worker: Callable[..., Proc],
) -> None:
    start_worker("redis-restart", ARBORIST_BROKER_URL=private_redis.url)
    queue = CeleryQueue.from_settings(Settings(_env_file=None, broker_url=private_redis.url))
    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)
    broker = private_redis.client()
    try:
        # The worker's first reaper sweep marks the fresh Redis (and would re-send any queued job): let it pass.
        wait_for(lambda: broker.exists(BROKER_MARKER), timeout=30, what="the reaper's first sweep")
        model_id, dataset_id = api.upload(digits_files)
        job_a = _create_job(sessions, model_id, dataset_id, job_spec(epochs=40, batch_size=1))  # 10-20 s
        job_b = _create_job(sessions, model_id, dataset_id, job_spec(epochs=2))
        queue.enqueue(job_a, queue="cpu")
        wait_for(
            lambda: api.job(job_a)["step"] is not None and api.job(job_a)["step"] >= 2,
            timeout=90,
            what="job A to train an epoch",
            on_timeout=api.diagnostics,
        )
        queue.enqueue(job_b, queue="cpu")
        wait_for(lambda: broker.llen("cpu") == 1, timeout=10, what="job B's message to wait in Redis")
        assert api.job(job_a)["state"] == "running", api.job(job_a)

        private_redis.kill()  # restart without persistence: B's message (and A's unacked one) are gone
        time.sleep(1)
        private_redis.start()
        assert broker.llen("cpu") == 0 and api.job(job_b)["state"] == "queued"

        done_a = api.wait_state(job_a, {"succeeded", "failed", "canceled"}, timeout=120)
        done_b = api.wait_state(job_b, {"succeeded", "failed", "canceled"}, timeout=120)
        assert done_a["state"] == "succeeded" and done_a["attempts"] == 1, done_a
        assert done_b["state"] == "succeeded" and done_b["attempts"] == 1, done_b
        with sessions() as s:
            resent = [e.data for e in outputs.list_events(session=s, job_id=job_b, limit=1000) if e.type == "resent"]
        assert resent == [{"reason": "broker lost its messages"}], resent
    finally:
        broker.close()
        engine.dispose()
