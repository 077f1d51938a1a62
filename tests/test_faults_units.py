"""Unit-level pieces of fault handling (issue #6); the end-to-end tests are in tests/e2e/test_faults_e2e.py.

A full disk is recognized through wrappers and leaves no temporary file (artifact store, checkpoints, reports);
the API answers a database outage with 503 and a full disk with 507; the events stream survives a database
outage and ends when the server is told to stop."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy.exc import OperationalError

from core.errors import StorageFull, no_space_error
from core.runs.checkpoint import DirectoryCheckpointer
from core.service.artifacts import ArtifactStore
from core.service.settings import Settings


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_no_space_error_sees_through_wrappers() -> None:
    assert no_space_error(_enospc()) is not None
    assert no_space_error(OSError(errno.EDQUOT, "quota")) is not None
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert no_space_error(wrapped) is wrapped  # safetensors' SafetensorError
    try:
        try:
            raise _enospc()
        except OSError as exc:
            raise ValueError("while saving") from exc
    except ValueError as outer:
        assert isinstance(no_space_error(outer), OSError)
    assert no_space_error(OSError(errno.EACCES, "denied")) is None
    assert no_space_error(RuntimeError("boom")) is None
    assert StorageFull.status == 507 and StorageFull.type == "storage-full"


def test_store_commit_failure_leaves_nothing(tmp_path: Path) -> None:
    """A full disk often shows only at close (the last buffered bytes): the temporary file goes too."""
    store = ArtifactStore(str(tmp_path))
    writer = store.writer("jobs/j/report.json")
    writer.write(b"{}")

    class FailingClose:
        def __init__(self, fh):
            self.fh = fh

        def close(self) -> None:
            self.fh.close()
            raise _enospc()

    writer._fh = FailingClose(writer._fh)  # type: ignore[assignment]
    with pytest.raises(OSError) as info:
        writer.commit()
    assert info.value.errno == errno.ENOSPC
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    writer.abort()  # harmless afterwards


def test_checkpoint_not_committed_leaves_previous_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = DirectoryCheckpointer(tmp_path)
    ckpt.save({"w": torch.ones(3)}, {"step": 1})
    import core.io.files as files  # the checkpoint's atomic write

    real_fdopen = os.fdopen

    def full_fdopen(fd: int, *args, **kwargs):
        fh = real_fdopen(fd, *args, **kwargs)
        fh.write = lambda *_: (_ for _ in ()).throw(_enospc())  # type: ignore[method-assign]
        return fh

    monkeypatch.setattr(files.os, "fdopen", full_fdopen)
    with pytest.raises(OSError):
        ckpt.save({"w": torch.zeros(3)}, {"step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "state-1.safetensors"]
    tensors, meta = ckpt.load()
    assert meta == {"step": 1} and torch.equal(tensors["w"], torch.ones(3))


@pytest.fixture
def app_settings(tmp_path: Path) -> Settings:
    from core.service.db import migrate

    url = f"sqlite:///{tmp_path / 'u.db'}"
    migrate.upgrade(url)
    return Settings(
        _env_file=None,
        database_url=url,
        artifact_root=str(tmp_path / "art"),
        queue_backend="null",
        sse_poll_interval_s=0.05,
    )


def test_api_maps_database_outage_and_full_disk(app_settings: Settings) -> None:
    from api.main import create_app

    app = create_app(app_settings)

    @app.get("/db-down")
    def db_down() -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    @app.get("/disk-full")
    def disk_full() -> None:
        raise _enospc()

    async def run() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/db-down")
            assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
            assert r.json()["type"].endswith("/service-unavailable") and "refused" not in r.text
            r = await c.get("/disk-full")
            assert r.status_code == 507 and r.json()["type"].endswith("/storage-full"), r.text

    asyncio.run(run())


class _FakeRequest:
    def __init__(self, app) -> None:
        self.app = app

    async def is_disconnected(self) -> bool:
        return False


def test_events_stream_survives_database_outage_and_ends_on_shutdown(
    app_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.main import create_app
    from api.routers import outputs
    from core.service.db.tables import JobState

    app = create_app(app_settings)
    calls = {"n": 0}

    def flaky_poll(factory, job_id, after):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        if calls["n"] == 4:
            app.state.shutting_down = True  # SIGTERM arrived: the stream ends without `end`
        return JobState.RUNNING, []

    monkeypatch.setattr(outputs, "_poll", flaky_poll)

    async def run() -> list[str]:
        return [chunk async for chunk in outputs._follow(_FakeRequest(app), "job", 0, 0.01, 30.0)]

    monkeypatch.setattr(outputs.anyio, "sleep", lambda s: asyncio.sleep(0))
    chunks = asyncio.run(run())
    assert calls["n"] == 4 and chunks[0].startswith("retry:")
    assert not any("event: end" in c for c in chunks), chunks


def test_shutdown_signal_is_chained(app_settings: Settings) -> None:
    from api.lifecycle import shutting_down, watch_shutdown_signals
    from api.main import create_app

    app = create_app(app_settings)
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        undo = watch_shutdown_signals(app)
        assert not shutting_down(app)
        signal.raise_signal(signal.SIGTERM)
        assert shutting_down(app) and seen == [signal.SIGTERM]  # the server's own handler still runs
        undo()
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler) and handler.__name__ == "<lambda>"  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)
