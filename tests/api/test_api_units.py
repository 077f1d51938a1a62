"""Settings, the artifact store, ``make_queue`` and the app factory, without a server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import httpx
import pytest

from _api_testkit import assert_problem, files_under
from core.errors import TooLarge
from core.service.artifacts import ArtifactStore
from core.service.queue import EmbeddedQueue, JobQueue, NullQueue, make_queue
from core.service.settings import Settings, get_settings


def test_settings_env_prefix_and_normalisation(monkeypatch):
    monkeypatch.setenv("ARBORIST_DATABASE_URL", "postgresql://u:p@db/arborist")
    monkeypatch.setenv("ARBORIST_DATA_ALLOWED_ROOTS", '["/a", "/b"]')
    monkeypatch.setenv("ARBORIST_MAX_UPLOAD_BYTES", "123")
    s = Settings(_env_file=None)
    assert s.database_url == "postgresql+psycopg://u:p@db/arborist"
    assert s.data_allowed_roots == ["/a", "/b"] and s.max_upload_bytes == 123
    assert not s.is_sqlite and s.queue_name == "embedded"
    assert Settings(_env_file=None, broker_url="redis://x").queue_name == "celery"
    get_settings.cache_clear()
    assert get_settings() is get_settings()
    get_settings.cache_clear()


def test_defaults():
    s = Settings(_env_file=None)
    assert s.database_url == "sqlite:///./data/arborist.db" and s.broker_url is None
    assert s.max_upload_bytes == 2 * 1024**3 and s.max_json_bytes == 1024**2
    assert s.data_allowed_roots == ["./data/datasets"] and s.environment == "dev"


def test_settings_travel_to_a_child_process(monkeypatch):
    s = Settings(
        _env_file=None,
        database_url="postgresql://u:p@db/a",
        data_allowed_roots=["/a"],
        memory_budget_mb=512,
        queue_backend="null",
    )
    assert Settings.from_payload(s.as_payload()) == s
    env = s.to_env()
    assert env["ARBORIST_DATA_ALLOWED_ROOTS"] == '["/a"]' and env["ARBORIST_MEMORY_BUDGET_MB"] == "512.0"
    assert "ARBORIST_BROKER_URL" not in env and "ARBORIST_QUEUE_NAME" not in env  # unset, computed
    for name in [n for n in os.environ if n.startswith("ARBORIST_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings(_env_file=None) == s


def test_placeholder_secrets_rejected_outside_dev():
    url = "postgresql+psycopg://arborist:changethis@db/arborist"
    assert Settings(_env_file=None, database_url=url).environment == "dev"
    with pytest.raises(ValueError, match="placeholder"):
        Settings(_env_file=None, environment="prod", database_url=url)


def test_put_stream_atomic_and_capped(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    size, sha = store.put_stream("a/b.bin", [b"abc", b"", b"def"])
    assert (size, sha) == (6, hashlib.sha256(b"abcdef").hexdigest())
    assert store.exists("a/b.bin") and store.size("a/b.bin") == 6 and store.open("a/b.bin").read() == b"abcdef"
    assert store.local_path("a/b.bin").read_bytes() == b"abcdef"

    with pytest.raises(TooLarge):
        store.put_stream("a/c.bin", iter([b"x" * 10] * 5), max_bytes=25)
    assert not store.exists("a/c.bin")
    assert [p.name for p in files_under(tmp_path / "store")] == ["b.bin"]  # no temp file left

    def boom():
        yield b"partial"
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        store.put_stream("a/d.bin", boom())
    assert [p.name for p in files_under(tmp_path / "store")] == ["b.bin"]

    store.move("a/b.bin", "z/b.bin")
    assert store.exists("z/b.bin") and not store.exists("a/b.bin")
    store.delete("z/b.bin")
    store.delete("z/b.bin")  # idempotent
    for bad in ("../x", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            store.exists(bad)


def test_put_stream_memory_stays_flat(tmp_path):
    store = ArtifactStore(str(tmp_path))
    chunk = b"\1" * 65536
    tracemalloc.start()
    try:
        size, _ = store.put_stream("big.bin", (chunk for _ in range(256)))  # 16 MiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == 16 * 1024 * 1024
    assert peak < 4 * 1024 * 1024, peak


def test_memory_fsspec_store():
    store = ArtifactStore(f"memory://arb-{id(object())}")
    store.put_stream("k/v.bin", [b"hello"])
    assert store.local_path("k/v.bin") is None and store.open("k/v.bin").read() == b"hello"
    with store.materialize("k/v.bin") as path:
        assert path.read_bytes() == b"hello"


def test_make_queue_builds_the_backend_settings_name():
    from core.service.queue.celery import CeleryQueue

    broker = "redis://127.0.0.1:1/0"  # nothing listens: building a queue connects to nothing
    cases = [
        ({}, EmbeddedQueue),
        ({"broker_url": broker}, CeleryQueue),
        ({"queue_backend": "null"}, NullQueue),
        ({"broker_url": broker, "queue_backend": "embedded"}, EmbeddedQueue),
    ]
    for values, kind in cases:
        queue = make_queue(Settings(_env_file=None, **values))
        assert type(queue) is kind and isinstance(queue, JobQueue)
        assert queue.resends_waiting is (kind is CeleryQueue)
    for queue in (NullQueue(), EmbeddedQueue()):  # nothing to lose, nothing to send again
        assert queue.lost_messages() is False and queue.enqueue("job_x", queue="cpu") is None and queue.ping()
    with pytest.raises(ValueError):
        Settings(_env_file=None, queue_backend="nope")


@pytest.fixture
def unit_settings(tmp_path):
    from core.service.db import migrate

    url = f"sqlite:///{tmp_path / 'u.db'}"
    migrate.upgrade(url)
    return Settings(_env_file=None, database_url=url, artifact_root=str(tmp_path / "art"), queue_backend="null")


def test_unexpected_error_is_500_problem(unit_settings):
    from api.main import create_app

    app = create_app(unit_settings)  # queue resolved from settings ("null")

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail")

    async def run() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            resp = await c.get("/boom")
            body = assert_problem(resp, 500, "internal-error")
            assert "secret" not in resp.text and body["instance"] == "/boom"
            assert (await c.get("/readyz")).json()["checks"] == {"database": True, "queue": True}

    asyncio.run(run())


def test_lazy_module_app(monkeypatch, unit_settings):
    import api.main

    monkeypatch.setattr(api.main, "get_settings", lambda: unit_settings)
    assert "app" not in api.main.__dict__  # importing the module built nothing
    try:
        app = api.main.app
        assert app.state.settings is unit_settings and isinstance(app.state.queue, NullQueue)
        assert api.main.app is app
    finally:
        api.main.__dict__.pop("app", None)


def test_a_started_app_imports_nothing_at_its_first_job_check(tmp_path):
    """Job creation's checks import ~800 modules on their first run; the app does that at start-up, so the first
    POST /v1/jobs does not stall the server. In a fresh interpreter: the check after start-up imports nothing."""
    code = f"""
import subprocess
import sys
from fastapi.testclient import TestClient
from api.main import create_app
from core.runs.preflight import check_job
from core.service.queue import NullQueue
from core.service.settings import Settings
settings = Settings(_env_file=None, database_url="sqlite:///{tmp_path}/a.db", artifact_root="{tmp_path}/art",
                    auto_migrate=True)
with TestClient(create_app(settings, NullQueue())):
    before = set(sys.modules)
    check_job(__import__("core.runs.spec", fromlist=["PruneSpec"]).PruneSpec(sparsity=0.9), arch="mlp",
              arch_kwargs={{"in_features": 64, "hidden": [32], "num_classes": 10}}, num_examples=1000,
              input_shape=[64], num_classes=10, has_val=False)
    print(len(set(sys.modules) - before), "sympy" in before)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "True"], out.stdout


def test_the_status_poll_refuses_malformed_keys_without_the_database(tmp_path):
    """A key that cannot be one is a 401 before any database I/O, on the status poll (its own query) as on the
    other routes: with the database unreachable, 401 rather than 503."""
    from fastapi.testclient import TestClient

    from api.main import create_app

    settings = Settings(
        _env_file=None, database_url="postgresql+psycopg://nobody@127.0.0.1:9/none", artifact_root=str(tmp_path / "art")
    )
    client = TestClient(create_app(settings, NullQueue()))  # no lifespan: nothing connects at start-up
    for path in ("/v1/jobs", "/v1/jobs/job_0123456789abcdef0123456789ab"):
        for header in ("Bearer not-a-key", "Bearer arb__x"):
            assert_problem(client.get(path, headers={"Authorization": header}), 401, "unauthorized")
        # a well-formed key needs the database: the unreachable one is a 503, so the above really skipped it
        assert_problem(client.get(path, headers={"Authorization": "Bearer arb_abc_def"}), 503)
