"""A burst against ``arborist serve`` (``python -m cli.serve``, SQLite), as deployed: 200 clients at once of each
kind (list models, create a job, open an event stream, the status poll, the liveness probe), 1000 in all, after
200 event streams alone.

What every burst must satisfy is in ``tests/_burst.py`` (no 500, a 2xx or a 503 problem+json with Retry-After
within a bound, the liveness probe and the status poll answered within ~2 s meanwhile); here also a job for each
202 and for nothing else. The worker is left out (``--no-worker``): the API is what is under test, and 200 queued
jobs would keep a worker busy for minutes.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from _burst import KINDS, check_burst, run_burst
from _e2e_kit import Api, DigitsFiles, Proc, base_env, create_key, free_port, wait_for
from core.service.db.tables import Job


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``python -m cli.serve --no-worker`` on a fresh data directory: its URL and that directory."""
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp_path), "--no-worker"]
    proc = Proc(
        "serve",
        [sys.executable, "-m", "cli.serve", *args, "--log-level", "warning"],
        base_env(),
        tmp_path / "serve.log",
    ).start()
    try:
        wait_for(lambda: "Create an API key" in proc.log(50_000), timeout=90, what="serve's banner")
        yield f"http://127.0.0.1:{port}", tmp_path
    finally:
        proc.stop(grace=20)


def test_serve_answers_a_burst(serve: tuple[str, Path], digits_files: DigitsFiles) -> None:
    base, data_dir = serve
    db_url = f"sqlite:///{data_dir / 'arborist.db'}"
    key = create_key(db_url, f"burst-{uuid.uuid4().hex[:6]}")
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        model_id, dataset_id = Api(client).upload(digits_files)
        body = {"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}}
        job = Api(client).submit(model_id, dataset_id, body["spec"])

    created = 0
    for kinds in (("events",), KINDS):  # the streams alone (they all open), then everything at once
        burst = run_burst(base, key, kinds, body, job["id"])
        print(f"\n[serve] {burst.summary()}")
        check_burst(burst)
        created += burst.created()
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            jobs = conn.scalar(select(func.count()).select_from(Job))
    finally:
        engine.dispose()
    assert jobs == 1 + created
