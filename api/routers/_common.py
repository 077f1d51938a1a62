"""Bits shared by the routers."""

from __future__ import annotations

from fastapi import Query

LimitQuery = Query(50, ge=1, le=200, description="page size")
CursorQuery = Query(None, max_length=200, description="the next_cursor of the previous page")
#: the OpenAPI header of a response that created a resource, and the 201 response that has it
LOCATION = {"Location": {"description": "URL of the new resource", "schema": {"type": "string"}}}
CREATED = {201: {"headers": LOCATION}}
