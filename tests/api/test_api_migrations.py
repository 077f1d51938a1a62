"""Alembic on both databases: upgrade from empty, the schema matches the models, downgrade to base, upgrade."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from _pg import DATABASES, empty_database
from core.service.db import migrate
from core.service.db.base import make_engine
from core.service.db.tables import Base

TABLES = {"tenants", "api_keys", "models", "datasets", "jobs", "job_metrics", "job_events", "artifacts"}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()


@pytest.fixture(params=DATABASES)
def empty_db(request, tmp_path):
    with empty_database(request.param, tmp_path) as url:
        yield url


def test_upgrade_downgrade_upgrade(empty_db):
    assert migrate.current(empty_db) is None
    migrate.upgrade(empty_db)
    assert migrate.current(empty_db) == migrate.head()
    assert _tables(empty_db) >= TABLES
    assert _diff(empty_db) == []  # the migrations build exactly what the models declare

    migrate.downgrade(empty_db, "base")
    assert migrate.current(empty_db) is None
    assert _tables(empty_db) & TABLES == set()

    migrate.upgrade(empty_db)
    assert migrate.current(empty_db) == migrate.head() and _tables(empty_db) >= TABLES
