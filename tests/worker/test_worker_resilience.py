"""A database outage during a run (PostgreSQL restart, simulated by cutting a TCP proxy: the shared server
itself is not touched) and the database retry helper."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError, ProgrammingError

from conftest import World
from core.service.db.tables import JobState
from worker.db import Database
from worker.runner import run_job


class TcpProxy:
    """127.0.0.1:<port> → target. ``down()`` closes every connection and the listener (connection refused),
    ``up()`` listens again on the same port: what clients see when the server restarts."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(64)
        self.port = lst.getsockname()[1]
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            lst, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if lst is not None:
            try:
                lst.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone keeps listening
            except OSError:
                pass
            lst.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_database_outage_mid_run_is_ridden_out(
    world_factory: Callable[..., World], pg_schema_url: Callable[..., str]
) -> None:
    world_factory(pg_schema_url())  # migrate directly
    proxy = TcpProxy(("127.0.0.1", 5432))
    try:
        world = world_factory(pg_schema_url("127.0.0.1", proxy.port), heartbeat_timeout_s=60.0)
        job_id = world.job(
            {
                "sparsity": 0.8,
                "fisher": {"samples": 64, "lambda": 1e-3},
                "device": "cpu",
                "finetune": {"epochs": 6, "batch_size": 2},
            }
        )
        out: list[str] = []
        thread = threading.Thread(target=lambda: out.append(run_job(job_id, world.settings, worker="t@h:1")))
        thread.start()
        deadline = time.monotonic() + 60
        while not any(k == "checkpoint" and d["phase"] == "trained" for k, d in world.events(job_id)):
            assert time.monotonic() < deadline and thread.is_alive(), world.events(job_id)[-3:]
            time.sleep(0.05)
        world.sessions.kw["bind"].dispose()  # the test's own pooled connections would die too
        proxy.down()
        time.sleep(4)  # "PostgreSQL restarting"
        assert thread.is_alive()
        proxy.up()
        thread.join(120)
        assert out == ["succeeded"]
        job = world.get(job_id)
        assert job.state is JobState.SUCCEEDED and job.attempts == 1
        kinds = [k for k, _ in world.events(job_id)]
        assert kinds.count("checkpoint") == 7 and kinds[-1] == "state"
    finally:
        proxy.down()


def test_database_call_retries_transient_errors_only(tmp_path: pytest.TempPathFactory) -> None:
    db = Database(f"sqlite:///{tmp_path}/r.db")
    calls = {"n": 0}

    def flaky(session: object) -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        return "ok"

    assert db.call(flaky, base_s=0.01) == "ok" and calls["n"] == 3

    def broken(session: object) -> None:
        raise ProgrammingError("SELECT nope", {}, Exception("syntax error"))

    with pytest.raises(ProgrammingError):
        db.call(broken)

    def down(session: object) -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    start = time.monotonic()
    with pytest.raises(OperationalError):
        db.call(down, deadline_s=0.5, base_s=0.01, max_sleep_s=0.1)
    assert time.monotonic() - start < 2
    assert db.call(lambda s: s.execute(text("SELECT 1")).scalar()) == 1
    db.dispose()
