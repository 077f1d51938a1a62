"""Bits shared by the routers."""

from __future__ import annotations

from fastapi import Query

from core.service.db.rows import CURSOR_PATTERN

LimitQuery = Query(50, ge=1, le=200, description="page size")
CursorQuery = Query(
    None, max_length=37, pattern=CURSOR_PATTERN, description="the next_cursor of the previous page (opaque)"
)
#: the OpenAPI header of a response that created a resource, and the 201 response that has it
LOCATION = {"Location": {"description": "URL of the new resource", "schema": {"type": "string"}}}
CREATED = {201: {"headers": LOCATION}}
