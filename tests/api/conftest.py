"""The API under a real uvicorn server (background thread, free 127.0.0.1 port), on a real database.

The database is parametrised over SQLite (a temporary file) and PostgreSQL (a fresh schema per test session,
dropped afterwards), and migrated with Alembic. The job queue is a recording fake: the real Celery queue comes
with the worker. Each test gets its own tenant, so tests never see each other's rows.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from _net import free_port
from _pg import DATABASES, empty_database
from api.main import create_app
from core.service.artifacts import ArtifactStore
from core.service.db import inputs, migrate, tenants
from core.service.db.tables import Tenant
from core.service.settings import Settings

MAX_UPLOAD = 256 * 1024
MAX_JSON = 16 * 1024


class RecordingQueue:
    """A JobQueue that records what the API asked of it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.enqueued: list[tuple[str, str]] = []
        self.revoked: list[str] = []
        self.fail = False
        self.healthy = True

    def enqueue(self, job_id: str, *, queue: str) -> str | None:
        if self.fail:
            raise ConnectionError("broker down")
        with self.lock:
            self.enqueued.append((job_id, queue))
            return f"task-{job_id}-{len(self.enqueued)}"

    def revoke(self, task_id: str) -> None:
        with self.lock:
            self.revoked.append(task_id)

    def ping(self) -> bool:
        return self.healthy

    def queues_of(self, job_id: str) -> list[str]:
        with self.lock:
            return [q for j, q in self.enqueued if j == job_id]


@dataclass
class Harness:
    base_url: str
    settings: Settings
    queue: RecordingQueue
    sessionmaker: sessionmaker[Session]
    store: ArtifactStore
    db: str
    clients: list[httpx.Client] = field(default_factory=list)

    def session(self) -> Session:
        return self.sessionmaker()

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        c = httpx.Client(base_url=self.base_url, headers=headers, timeout=30.0, **kwargs)
        self.clients.append(c)
        return c


@pytest.fixture(scope="session", params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with empty_database(request.param, tmp_path_factory.mktemp(request.param)) as url:
        yield url


@pytest.fixture(scope="session")
def server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    migrate.upgrade(db_url)
    root = tmp_path_factory.mktemp("api")
    (root / "datasets").mkdir()
    settings = Settings(
        _env_file=None,
        database_url=db_url,
        artifact_root=str(root / "artifacts"),
        data_allowed_roots=[str(root / "datasets")],
        max_upload_bytes=MAX_UPLOAD,
        max_json_bytes=MAX_JSON,
        sse_poll_interval_s=0.05,
        sse_max_seconds=2.0,
    )
    with serve_app(settings) as harness:
        yield harness


@contextmanager
def serve_app(settings: Settings) -> Iterator[Harness]:
    """``create_app(settings)`` with a ``RecordingQueue``, served by uvicorn on a free port in a thread (stopped on
    exit). The database must be migrated."""
    queue = RecordingQueue()
    app = create_app(settings, queue)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    harness = Harness(
        base_url=f"http://127.0.0.1:{port}",
        settings=settings,
        queue=queue,
        sessionmaker=app.state.sessionmaker,
        store=app.state.store,
        db="sqlite" if settings.database_url.startswith("sqlite") else "postgresql",
    )
    try:
        yield harness
    finally:
        for c in harness.clients:
            c.close()
        srv.should_exit = True
        thread.join(timeout=10)


@dataclass
class Account:
    tenant: Tenant
    key: str
    client: httpx.Client


@pytest.fixture
def make_account(server: Harness) -> Callable[[], Account]:
    def make() -> Account:
        with server.session() as s:
            tenant = tenants.get_or_create_tenant(session=s, name=f"t-{uuid.uuid4().hex[:10]}")
            _, key = tenants.create_api_key(session=s, tenant=tenant)
        return Account(tenant=tenant, key=key, client=server.client(key))

    return make


@pytest.fixture
def account(make_account: Callable[[], Account]) -> Account:
    return make_account()


@pytest.fixture
def client(account: Account) -> httpx.Client:
    return account.client


@pytest.fixture
def seed(server: Harness, account: Account) -> Callable[..., tuple[str, str]]:
    """Inserts a model and a dataset row for the current tenant (no files): for job tests. They fit each
    other and the default spec (job creation checks the rows: a 64-input MLP, 1000 examples of 64 features)."""

    def make(tenant: Tenant | None = None) -> tuple[str, str]:
        t = tenant or account.tenant
        with server.session() as s:
            m = inputs.create_model(
                session=s,
                tenant=t,
                name="m",
                format="safetensors",
                size=1,
                sha256="0" * 64,
                path=f"models/{t.id}/none.safetensors",
                arch="mlp",
                arch_kwargs={"in_features": 64, "hidden": [32], "num_classes": 10},
                num_parameters=64 * 32 + 32 + 32 * 10 + 10,
            )
            d = inputs.create_dataset(
                session=s,
                tenant=t,
                name="d",
                format="npz",
                size=1,
                path=f"datasets/{t.id}/x",
                num_examples=1000,
                input_shape=[64],
                num_classes=10,
            )
            return m.id, d.id

    return make
