"""Assertions shared by the API tests (importable: conftest modules are not)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

PROBLEMS = "https://arborist.dev/problems/"
PG_URL = os.environ.get("ARBORIST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def files_under(root: str | Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.is_file()]


def assert_problem(resp: httpx.Response, status: int, slug: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body = resp.json()
    assert body["status"] == status
    assert body["title"]
    assert body["type"].startswith(PROBLEMS) or body["type"] == "about:blank"
    if slug is not None:
        assert body["type"] == PROBLEMS + slug, body
    return body


def pg_available() -> bool:
    engine = sa.create_engine(PG_URL)
    try:
        with engine.connect():
            return True
    except Exception:
        return False
    finally:
        engine.dispose()


def pg_schema_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


def create_pg_schema() -> tuple[str, str]:
    schema = f"arb_test_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    return schema, pg_schema_url(schema)


def drop_pg_schema(schema: str) -> None:
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()
