"""Assertions shared by the API tests (importable: conftest modules are not)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

PROBLEMS = "https://arborist.dev/problems/"


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
