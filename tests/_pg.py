"""Empty databases for tests: a fresh PostgreSQL schema (shared by the API, worker and end-to-end fixtures) or a
SQLite file."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_URL = os.environ.get("ARBORIST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
DATABASES = ("sqlite", "postgresql")  # what the database fixtures are parametrised over


def schema_url(schema: str, host: str | None = None, port: int | None = None) -> str:
    """``PG_URL`` with its search_path set to ``schema`` (and optionally another host/port: a proxy)."""
    url = sa.engine.make_url(PG_URL)
    if host or port:
        url = url.set(host=host or url.host, port=port or url.port or 5432)
    base = url.render_as_string(hide_password=False)
    return f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"


@contextmanager
def fresh_schema(prefix: str) -> Iterator[str]:
    """Creates schema ``<prefix>_<random>`` and yields its name; drops it afterwards. Skips the test when
    PostgreSQL is unreachable. The engine pings before reuse, so a server restart in between is survived."""
    engine = sa.create_engine(PG_URL, pool_pre_ping=True)
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001
        engine.dispose()
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield schema
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@contextmanager
def empty_database(kind: str, directory: Path) -> Iterator[str]:
    """The URL of an empty database of ``kind`` (one of ``DATABASES``): a SQLite file in ``directory``, or a fresh
    PostgreSQL schema, dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'arborist.db'}"
        return
    with fresh_schema("arb_test") as schema:
        yield schema_url(schema)


@contextmanager
def migrated_schema(prefix: str) -> Iterator[str]:
    """The URL of a fresh PostgreSQL schema ``<prefix>_<random>`` migrated to head; dropped afterwards."""
    from core.service.db import migrate

    with fresh_schema(prefix) as schema:
        url = schema_url(schema)
        migrate.upgrade(url)
        yield url
