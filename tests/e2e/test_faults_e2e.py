"""Faults, end to end, with real processes on the real PostgreSQL and Redis (issue #6). Each job ends
``succeeded`` (resumed where it had to) or ``failed`` with a reason; no artifact is half-written; nothing stays
``running``.

1. Disk full: the artifact store is a tiny tmpfs. An upload into the full store is refused (507) and leaves
   nothing; a job that cannot write its first checkpoint, and one that cannot store all its outputs, end
   ``failed`` (``storage-full``, "no space left on device"), once, with no temporary file, no partial output
   and no artifact row left (the second keeps its complete checkpoint). Once space is freed, retrying them
   works: the second resumes from its checkpoint.
2. PostgreSQL really restarted (``pg_ctlcluster restart``) while a Celery worker runs a WoodFisher job and an
   events stream is open on the API: the job succeeds (resumed if the reaper had requeued it), the same events
   stream goes on to ``end`` and the API answers again.
3. The API restarted while jobs run, by SIGTERM (it exits at once although an events stream is open: the stream
   ends and the client reconnects with ``Last-Event-ID``) and by SIGKILL (the stream breaks; reconnect): the
   jobs go on in the worker (attempt 1) and finish, the new API serves their state and artifacts, and the
   events seen over the three connections are exactly the job's events, in order, none lost or doubled.

``tests/worker/test_worker_resilience.py`` keeps the unit-level variant of 2 (a TCP proxy cut under one run).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from _e2e_kit import (
    Api,
    ApiServer,
    DigitsFiles,
    Proc,
    SseEvent,
    check_pruned_model,
    create_key,
    job_spec,
    sse_connect,
    wait_for,
)
from core.service.db import jobs
from core.service.db.base import make_engine, make_sessionmaker

FAULTS_REDIS_URL = os.environ.get("ARBORIST_TEST_FAULTS_REDIS_URL", "redis://127.0.0.1:6379/13")  # db 13: disk full
PG_CLUSTER = os.environ.get("ARBORIST_TEST_PG_CLUSTER", "15 main").split()
TERMINAL = {"succeeded", "failed", "canceled"}


def _is_trained_checkpoint(ev: SseEvent, epoch: int = 1) -> bool:
    return ev.kind == "checkpoint" and ev.data["data"]["phase"] == "trained" and ev.data["data"]["epoch"] >= epoch


def _check_ids(events: list[SseEvent]) -> list[int]:
    ids = [ev.id for ev in events if ev.kind != "end"]
    assert all(i is not None for i in ids) and ids == sorted(ids) and len(set(ids)) == len(ids), ids
    return ids  # type: ignore[return-value]


@pytest.fixture(scope="module")
def faults_worker(start_worker: Callable[..., Proc]) -> Iterator[Proc]:
    proc = start_worker("faults")
    yield proc
    proc.stop()


# --- 1. disk full ------------------------------------------------------------------------------------------------


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(mount: Path, *, leave: int) -> Path:
    """Fills the filesystem, then gives back ``leave`` bytes (a multiple of the page size)."""
    filler = mount / "filler.bin"
    with open(filler, "ab", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    os.truncate(filler, filler.stat().st_size - leave)
    assert _free_bytes(mount) == leave, (_free_bytes(mount), leave)
    return filler


def _store_files(mount: Path) -> list[str]:
    return sorted(str(p.relative_to(mount)) for p in mount.rglob("*") if p.is_file() and p.name != "filler.bin")


def _no_temporaries(mount: Path) -> None:
    files = _store_files(mount)
    assert not [f for f in files if ".tmp" in f or f.startswith("staging")], files


@pytest.fixture
def tiny_store(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: room for the uploaded model and data, little for anything else."""
    mount = tmp_path / "store"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()
        if any(s in message.lower() for s in ("permission denied", "not permitted", "superuser", "eperm")):
            pytest.skip(f"cannot mount a tmpfs here (EPERM): {message}")
        pytest.fail(f"mount -t tmpfs failed: {message}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_disk_full_fails_jobs_cleanly_and_service_recovers(
    tiny_store: Path,
    service_env: dict[str, str],
    e2e_dir: Path,
    processes: list[Proc],
    pg_url: str,
    digits_files: DigitsFiles,
    start_worker: Callable[..., Proc],
) -> None:
    # Its own broker db (a worker left by another test must not take these jobs: it has another store).
    broker = redis.Redis.from_url(FAULTS_REDIS_URL, socket_connect_timeout=2)
    broker.flushdb()
    store_env = {"ARBORIST_ARTIFACT_ROOT": str(tiny_store), "ARBORIST_BROKER_URL": FAULTS_REDIS_URL}
    server = ApiServer({**service_env, **store_env}, e2e_dir, processes, name="diskfull")
    worker: Proc | None = None
    client = httpx.Client(base_url=server.base, timeout=30)
    try:
        server.start(wait=False)
        worker = start_worker("diskfull", **store_env)
        server.wait_ready()
        client.headers["Authorization"] = f"Bearer {create_key(pg_url, f'e2e-disk-{uuid.uuid4().hex[:8]}')}"
        api = Api(client, lambda: "\n".join(p.describe() for p in (server.proc, worker) if p is not None))
        model_id, dataset_id = api.upload(digits_files)
        inputs = _store_files(tiny_store)
        spec = job_spec(epochs=0)  # prune only: one checkpoint (~24 KiB), then ~90 KiB of outputs

        # A full disk: an upload is refused (507) and leaves nothing behind.
        filler = _fill(tiny_store, leave=0)
        with open(digits_files.model, "rb") as fh:
            r = client.post(
                "/v1/models",
                files={"file": (digits_files.model.name, fh, "application/octet-stream")},
                data={"name": "too-much", "arch": "mlp"},
            )
        assert r.status_code == 507 and r.json()["type"].endswith("/storage-full"), (r.status_code, r.text)
        assert _store_files(tiny_store) == inputs

        # The first checkpoint does not fit.
        first = api.submit(model_id, dataset_id, spec)["id"]
        done = api.wait_state(first, TERMINAL, timeout=90)
        assert done["state"] == "failed" and done["attempts"] == 1, done
        assert done["error"]["type"].endswith("/storage-full"), done["error"]
        assert "no space left on device" in done["error"]["detail"].lower(), done["error"]
        assert _store_files(tiny_store) == inputs  # not even a temporary file of the checkpoint

        # The checkpoint fits (24 KiB), the outputs do not: they fail part-way (pruned.safetensors, masks and
        # model.onnx fit, report.json fails when its buffered bytes are flushed).
        os.truncate(filler, filler.stat().st_size - 64 * 1024)
        second = api.submit(model_id, dataset_id, spec)["id"]
        done = api.wait_state(second, TERMINAL, timeout=90)
        assert done["state"] == "failed" and done["attempts"] == 1, done
        assert done["error"]["type"].endswith("/storage-full"), done["error"]
        assert "no space left on device" in done["error"]["detail"].lower(), done["error"]
        assert client.get(f"/v1/jobs/{second}/artifacts").json()["data"] == []
        r = client.get(f"/v1/jobs/{second}/artifacts/pruned.safetensors")
        assert r.status_code == 404, r.text
        _no_temporaries(tiny_store)
        assert not (tiny_store / "jobs" / second).exists() or not any((tiny_store / "jobs" / second).iterdir())
        checkpoint = sorted(p.name for p in (tiny_store / "checkpoints" / second).iterdir())
        assert checkpoint == ["latest.json", "state-1.safetensors"], checkpoint  # complete, kept for a retry
        kinds = [ev.kind for ev in sse_connect(client, second, timeout=30)]
        assert "checkpoint" in kinds and "artifact" not in kinds, kinds

        # Failed once, not retried (the first failed a whole job earlier): still failed, one attempt.
        job = api.job(first)
        assert job["state"] == "failed" and job["attempts"] == 1, job

        # Space freed: the API and the worker carry on; the retried job resumes from its checkpoint and succeeds.
        filler.unlink()
        r = client.post(f"/v1/jobs/{second}/retry")
        assert r.status_code in (200, 202), r.text
        done = api.wait_state(second, TERMINAL, timeout=90)
        assert done["state"] == "succeeded" and done["attempts"] == 2 and done["error"] is None, done
        resumed = [ev for ev in sse_connect(client, second, timeout=30) if ev.kind == "resumed"]
        assert resumed, "the retried job did not resume from its checkpoint"
        names = {a["name"] for a in client.get(f"/v1/jobs/{second}/artifacts").json()["data"]}
        assert {"pruned.safetensors", "masks.safetensors", "report.json", "curve.csv"} <= names, names
        check_pruned_model(api.download(second, "pruned.safetensors"), digits_files, min_accuracy=0.3)
        assert not (tiny_store / "checkpoints" / second).exists()  # deleted on success
        _no_temporaries(tiny_store)
    finally:  # before the store is unmounted
        client.close()
        for proc in (worker, server.proc):
            if proc is not None:
                proc.stop()
        broker.flushdb()
        broker.close()


# --- 2. PostgreSQL restarted ---------------------------------------------------------------------------------------


def _pg_ctl(action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, action], capture_output=True, text=True, timeout=90
    )


def _pg_start_time(engine: sa.Engine) -> object:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT pg_postmaster_start_time()")).scalar_one()


def _ensure_pg_up(engine: sa.Engine) -> None:
    """Starts the cluster if it is down, and waits until it accepts connections."""
    if _pg_ctl("status").returncode != 0:
        _pg_ctl("start")
    wait_for(
        lambda: _pg_start_time(engine) is not None,
        timeout=60,
        what="PostgreSQL to accept connections",
        on_timeout=lambda: _pg_ctl("status").stdout,
    )


def test_postgres_restart_mid_job(
    api: Api,
    digits_files: DigitsFiles,
    pg_url: str,
    faults_worker: Proc,
) -> None:
    host = make_url(pg_url).host
    if shutil.which("pg_ctlcluster") is None or host not in ("127.0.0.1", "localhost", "::1") or os.geteuid() != 0:
        pytest.skip("needs the local PostgreSQL cluster and root to restart it (pg_ctlcluster)")
    probe = sa.create_engine(pg_url, poolclass=NullPool, connect_args={"connect_timeout": 2})
    try:
        if _pg_ctl("status").returncode != 0:
            pytest.skip(f"PostgreSQL cluster {' '.join(PG_CLUSTER)} is not managed by pg_ctlcluster here")
        started_before = _pg_start_time(probe)
        model_id, dataset_id = api.upload(digits_files)
        job_id = api.submit(model_id, dataset_id, job_spec(epochs=12, batch_size=2))["id"]

        stream = sse_connect(api.client, job_id, timeout=180)
        seen: list[SseEvent] = []
        for ev in stream:
            seen.append(ev)
            assert ev.kind != "end", f"job ended before the restart: {ev}\n{api.diagnostics()}"
            if _is_trained_checkpoint(ev):
                break
        assert api.job(job_id)["state"] == "running"

        try:
            done = _pg_ctl("restart")
            assert done.returncode == 0, f"pg_ctlcluster restart failed: {done.stdout}{done.stderr}"
        finally:
            _ensure_pg_up(probe)  # whatever happened, the rest of the suite gets its database back
        assert _pg_start_time(probe) != started_before  # it really restarted

        # The API answers again, and the stream opened before the restart goes on to the end.
        wait_for(
            lambda: api.client.get("/readyz", timeout=5).status_code == 200,
            timeout=30,
            what="the API to be ready after the restart",
        )
        seen.extend(stream)
        assert seen[-1].kind == "end" and seen[-1].data["state"] == "succeeded", (seen[-3:], api.diagnostics())
        _check_ids(seen)

        job = api.job(job_id)
        assert job["state"] == "succeeded" and job["attempts"] in (1, 2) and job["error"] is None, job
        events = list(sse_connect(api.client, job_id, timeout=30))
        assert _check_ids(events) == _check_ids(seen)  # the open stream lost nothing across the restart
        if job["attempts"] == 2:  # the outage outlasted the heartbeat timeout: requeued, then resumed
            assert any(ev.kind == "resumed" for ev in events), [ev.kind for ev in events]
        metrics = api.client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
        keys = [(m["step"], m["kind"]) for m in metrics]
        assert len(keys) == len(set(keys)) == 1 + 1 + 12, keys  # dense, prune, 12 epochs
        check_pruned_model(api.download(job_id, "pruned.safetensors"), digits_files)
    finally:
        _ensure_pg_up(probe)
        probe.dispose()


# --- 3. the API restarted ----------------------------------------------------------------------------------------


def test_api_restart_mid_job(
    service_env: dict[str, str],
    e2e_dir: Path,
    processes: list[Proc],
    pg_url: str,
    digits_files: DigitsFiles,
    faults_worker: Proc,
) -> None:
    server = ApiServer(service_env, e2e_dir, processes, name="restart").start()
    key = create_key(pg_url, f"e2e-restart-{uuid.uuid4().hex[:8]}")
    clients: list[httpx.Client] = []

    def connect() -> Api:
        client = httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        clients.append(client)
        return Api(client, lambda: "\n".join(p.describe() for p in (server.proc, faults_worker) if p is not None))

    engine = make_engine(pg_url)
    sessions = make_sessionmaker(engine)

    def db_job(job_id: str):
        with sessions() as s:
            return jobs.get_unscoped(session=s, job_id=job_id)

    try:
        api = connect()
        model_id, dataset_id = api.upload(digits_files)
        long_id = api.submit(model_id, dataset_id, job_spec(epochs=45, batch_size=2))["id"]  # outlives two restarts
        short_id = api.submit(model_id, dataset_id, job_spec(epochs=1))["id"]  # waits in the queue

        # SIGTERM with an events stream open: the server stops at once, the stream ends without `end`.
        stream = sse_connect(api.client, long_id, timeout=120)
        seen: list[SseEvent] = []
        for ev in stream:
            seen.append(ev)
            assert ev.kind != "end", f"job ended too early: {ev}\n{api.diagnostics()}"
            if _is_trained_checkpoint(ev):
                break
        took = server.signal(signal.SIGTERM)
        assert took < 10, f"uvicorn took {took:.1f}s to stop on SIGTERM (held by the open events stream?)"
        seen.extend(stream)
        assert all(ev.kind != "end" for ev in seen), [ev.kind for ev in seen]
        assert db_job(long_id).state.value == "running"

        # The worker does not need the API: the job makes progress while no API runs (checked while the next
        # one starts).
        step = db_job(long_id).step or 0
        server.start(wait=False)
        wait_for(lambda: (db_job(long_id).step or 0) > step, timeout=60, what="progress while the API is down")

        # A new API on the same port; the client reconnects with Last-Event-ID and misses nothing.
        server.wait_ready()
        api = connect()
        stream = sse_connect(api.client, long_id, last_event_id=seen[-1].id, timeout=120)
        again: list[SseEvent] = []
        for ev in stream:
            again.append(ev)
            if len(again) == 3:
                break
        assert again[0].id is not None and again[0].id > (seen[-1].id or 0), (again[0], seen[-1])
        assert all(ev.kind != "end" for ev in again) and api.job(long_id)["state"] == "running", again

        # SIGKILL: the stream breaks (no clean end); reconnect to the next server.
        server.signal(signal.SIGKILL)
        try:
            again.extend(stream)
        except httpx.TransportError:
            pass
        assert all(ev.kind != "end" for ev in again)
        server.start()
        api = connect()
        rest = list(sse_connect(api.client, long_id, last_event_id=again[-1].id, timeout=180))
        assert rest[-1].kind == "end" and rest[-1].data["state"] == "succeeded", (rest[-3:], api.diagnostics())

        # Over three connections: exactly the job's events, in order.
        everything = list(sse_connect(api.client, long_id, timeout=30))
        assert _check_ids(seen + again + rest) == _check_ids(everything)

        # Both jobs ran on in the worker, undisturbed (first attempt), and the new API serves their results.
        for job_id in (long_id, short_id):
            job = api.wait_state(job_id, TERMINAL, timeout=120)
            assert job["state"] == "succeeded" and job["attempts"] == 1 and job["error"] is None, job
            names = {a["name"] for a in api.client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
            assert {"pruned.safetensors", "masks.safetensors", "report.json", "curve.csv"} <= names, names
        check_pruned_model(api.download(long_id, "pruned.safetensors"), digits_files)
        assert api.job(long_id)["progress"] == 1.0
    finally:
        for client in clients:
            client.close()
        if server.proc is not None:
            server.proc.stop()
        engine.dispose()
