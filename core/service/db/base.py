"""Engine and session factory from a URL. SQLite gets WAL, foreign keys and a busy timeout."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import DateTime, MetaData, create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

T = TypeVar("T")
log = logging.getLogger("arborist.db")

# Named constraints: Alembic's batch mode on SQLite needs names to alter or drop them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values; they come back as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
    finally:
        cur.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``. SQLite files get their parent directory created; ``:memory:`` shares one connection."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {})["check_same_thread"] = False
        db = u.database or ""
        if db in ("", ":memory:") or db.startswith("file::memory:"):
            kwargs.setdefault("poolclass", StaticPool)
            kwargs.pop("pool_size", None)  # one shared connection: no pool to size
            kwargs.pop("max_overflow", None)
            kwargs.pop("pool_timeout", None)
        else:
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(u, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


def begin_write(session: Session) -> None:
    """Makes the session's transaction a writer's from here on, so that what it reads next cannot change before it
    commits. SQLite: ``BEGIN IMMEDIATE`` (the database's one write lock, waited for under the busy timeout; the
    driver otherwise begins a transaction only at the first write, so a check read before it is not protected).
    PostgreSQL: nothing (its row locks and foreign-key checks do this there). Call it before the check."""
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        return
    if not conn.connection.driver_connection.in_transaction:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_read_engine(engine: Engine, **kwargs: Any) -> Engine:
    """The engine for reads (``read_retrying``): autocommit connections (no BEGIN and ROLLBACK round trips around
    the reads, and psycopg keeps its prepared statements, which it drops at every rollback, so PostgreSQL stops
    re-planning them). On PostgreSQL it has its own pool, without the ping at checkout (a round trip per request,
    ~15 % of a status poll's time): a read that meets a connection the server dropped is run again instead.
    SQLite has no ping to save; its engine is shared."""
    if engine.url.get_backend_name() == "sqlite":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    if "application_name" not in engine.url.query:  # named in pg_stat_activity, unless the URL names it
        kwargs.setdefault("connect_args", {}).setdefault("application_name", "arborist-read")
    return create_engine(engine.url, isolation_level="AUTOCOMMIT", pool_pre_ping=False, **kwargs)


def read_retrying(read_engine: Engine, read: Callable[[Connection], T]) -> T:
    """``read(connection)`` on a connection of ``make_read_engine``, run once more if the first try met a dropped
    connection (a database restart: SQLAlchemy then discards the whole pool, so the second try connects anew).
    Safe because a read has no effect to repeat; a database still down raises the second error."""
    try:
        with read_engine.connect() as conn:
            return read(conn)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        log.info("read on a dropped database connection (%s); reconnecting once", type(exc.orig).__name__)
    with read_engine.connect() as conn:
        return read(conn)


#: errors that mean "the database is (momentarily) unreachable" (a restart, a failover, a locked SQLite file) or
#: out of reach (no pooled connection came free within the pool timeout), not "the statement is wrong"
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError, PoolTimeout)


def is_transient_db_error(exc: BaseException) -> bool:
    if isinstance(exc, TRANSIENT_DB_ERRORS):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
