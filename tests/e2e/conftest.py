"""Fixtures for the end-to-end tests: real PostgreSQL (a fresh schema), real Redis (a dedicated, flushed db),
a real ``uvicorn`` process and real ``celery worker`` processes. Every process is killed in teardown."""

from __future__ import annotations

import os
import shutil
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
    make_digits_files,
    start_celery_worker,
)
from _pg import migrated_schema
from _redis import flushed_db

REDIS_URL = os.environ.get("ARBORIST_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")  # db 11: these tests only
#: ``s3``: the session's artifact store is a bucket on moto's S3 server instead of a local directory (the fault
#: and end-to-end suites on object storage: ``ARBORIST_TEST_ARTIFACT_STORE=s3 pytest tests/e2e/...``). The
#: disk-full test keeps its own tmpfs store either way.
ARTIFACT_STORE = os.environ.get("ARBORIST_TEST_ARTIFACT_STORE", "local")


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> DigitsFiles:
    return make_digits_files(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with migrated_schema("arb_e2e") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with flushed_db(REDIS_URL):
        yield REDIS_URL


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def artifact_store(e2e_dir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The session's artifact root and the environment that reaches it (``ARTIFACT_STORE``)."""
    if ARTIFACT_STORE == "local":
        yield str(e2e_dir / "artifacts"), {}
        return
    assert ARTIFACT_STORE == "s3", f"ARBORIST_TEST_ARTIFACT_STORE={ARTIFACT_STORE!r}: local or s3"
    from _s3 import moto_s3

    with moto_s3("arborist-e2e") as s3:
        yield f"s3://arborist-e2e/{uuid.uuid4().hex[:8]}/artifacts", s3.env


@pytest.fixture(scope="session")
def service_env(
    pg_url: str, redis_url: str, e2e_dir: Path, artifact_store: tuple[str, dict[str, str]]
) -> dict[str, str]:
    root, store_env = artifact_store
    return {**store_env, **_service_env(pg_url, redis_url, e2e_dir, root)}


def _service_env(pg_url: str, redis_url: str, e2e_dir: Path, artifact_root: str) -> dict[str, str]:
    return base_env(
        environment="dev",
        database_url=pg_url,
        broker_url=redis_url,
        artifact_root=artifact_root,
        data_allowed_roots=[str(e2e_dir / "datasets")],
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
        reaper_interval_s=REAPER_INTERVAL_S,
        max_attempts=3,
        sse_poll_interval_s=0.2,
        sse_max_seconds=300,
    )


@pytest.fixture(scope="session")
def processes() -> Iterator[list[Proc]]:
    """Every process a test starts; all are killed at the end of the session, whatever happened."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop(grace=5)


def diagnostics(procs: list[Proc]) -> Callable[[], str]:
    return lambda: "\n".join(p.describe() for p in procs)


@pytest.fixture(scope="session")
def api_server(service_env: dict[str, str], e2e_dir: Path, processes: list[Proc]) -> str:
    return ApiServer(service_env, e2e_dir, processes, log_level="warning").start().base


@pytest.fixture(scope="session")
def start_worker(service_env: dict[str, str], e2e_dir: Path, processes: list[Proc]) -> Callable[..., Proc]:
    """Starts ``celery worker`` (node ``<name>@e2e``, queues cpu and gpu, one job at a time) and waits for it."""

    def start(name: str, **env: str) -> Proc:
        return start_celery_worker(name, {**service_env, **env}, e2e_dir, processes)

    return start


@pytest.fixture(scope="session")
def api(api_server: str, pg_url: str, processes: list[Proc]) -> Iterator[Api]:
    key = create_key(pg_url, f"e2e-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=api_server, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        yield Api(client, diagnostics(processes))


@pytest.fixture(scope="session", autouse=True)
def _clean_scratch(e2e_dir: Path) -> Iterator[None]:
    yield
    shutil.rmtree(e2e_dir / "artifacts", ignore_errors=True)
