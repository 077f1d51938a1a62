"""Database access for workers: every unit of work runs in a fresh session and is retried with backoff
when the database is unreachable (a PostgreSQL restart, a failover, a locked SQLite file)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from core.service.db.base import is_transient_db_error, make_engine, make_sessionmaker

log = logging.getLogger("arborist.worker")
T = TypeVar("T")


def engine_for(url: str, *, pooled: bool = True) -> Engine:
    """An engine with a short connect timeout on PostgreSQL (so a dead server fails fast and we retry)."""
    kwargs: dict = {}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 5}
        if not pooled:
            kwargs["poolclass"] = NullPool
    return make_engine(url, **kwargs)


class Database:
    """``call(fn)`` runs ``fn(session)`` and commits nothing itself (the ``core.service.db`` functions do)."""

    def __init__(self, url: str, *, pooled: bool = True, engine: Engine | None = None):
        self.engine = engine or engine_for(url, pooled=pooled)
        self.sessions = make_sessionmaker(self.engine)

    def call(
        self,
        fn: Callable[[Session], T],
        *,
        deadline_s: float = 120.0,
        what: str = "database write",
        base_s: float = 0.2,
        max_sleep_s: float = 5.0,
    ) -> T:
        """Retries ``fn`` on transient errors with exponential backoff and jitter until ``deadline_s``
        has passed, then re-raises the last error."""
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                with self.sessions() as session:
                    return fn(session)
            except Exception as exc:
                if not is_transient_db_error(exc):
                    raise
                attempt += 1
                elapsed = time.monotonic() - start
                if elapsed >= deadline_s:
                    log.error("%s failed for %.0fs, giving up: %s", what, elapsed, exc)
                    raise
                sleep = min(max_sleep_s, base_s * 2 ** min(attempt, 10)) * (0.5 + random.random() / 2)
                log.warning("%s failed (%s); retry %d in %.1fs", what, type(exc).__name__, attempt, sleep)
                time.sleep(min(sleep, max(0.0, deadline_s - elapsed)) or 0.05)

    def dispose(self) -> None:
        self.engine.dispose()
