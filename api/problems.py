"""RFC 9457: every error leaves as ``application/problem+json`` with a stable ``type`` URI.

Domain errors (``ArboristError``), request validation errors (with a field list in ``errors``), HTTP errors
raised by the framework and unexpected exceptions (a generic 500, details only in the log) all go through here.
The documents themselves come from ``core.errors`` (``problem_from_error``, ``problem_for_status``); this module
only sends them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import (
    ArboristError,
    InvalidInput,
    InvalidRequest,
    QuotaExceeded,
    ServiceUnavailable,
    StorageFull,
    no_space_error,
    problem_for_status,
    problem_from_error,
)
from core.service.db.base import is_transient_db_error

log = logging.getLogger("arborist.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def _as_response(body: dict[str, Any], headers: Mapping[str, str] | None = None) -> ProblemResponse:
    """A problem document (``core.errors``) as the response; a 401 says how to authenticate."""
    out = dict(headers or {})
    if body["status"] == 401:
        out["WWW-Authenticate"] = 'Bearer realm="arborist"'
    return ProblemResponse(body, status_code=body["status"], headers=out)


async def _arborist_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, ArboristError)
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, (ServiceUnavailable, QuotaExceeded)) else None
    extra = {"limit": exc.limit} if isinstance(exc, QuotaExceeded) else {}
    return _as_response(problem_from_error(exc, instance=request.url.path, **extra), headers)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def field_errors(raw: Any) -> list[dict[str, Any]]:
    """pydantic/FastAPI error dicts reduced to ``loc``/``msg``/``type`` (no echo of the input)."""
    out = []
    for e in raw:
        out.append(
            {"loc": _jsonable(list(e.get("loc", ()))), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        )
    return out


async def _validation_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors(exc.errors())
    first = errors[0] if errors else None
    detail = f"{len(errors)} invalid field(s)"
    if first is not None:
        loc = ".".join(str(p) for p in first["loc"])
        detail += f"; first: {loc}: {first['msg']}"
    return _as_response(problem_from_error(InvalidRequest(detail, errors=errors), instance=request.url.path))


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method the API documents at the request's path (its OpenAPI paths; a path that is a documented path as
    it stands is that path's alone: ``/v1/jobs/plan`` (POST) is no job id of ``GET /v1/jobs/{job_id}``). Starlette's
    405 names only the first route that matched, while e.g. ``GET`` and ``DELETE /v1/models/{model_id}`` are two.
    Paths left out of the schema fall back to every route that takes the path."""
    path = request.scope.get("path", "")
    paths = request.app.openapi().get("paths", {})
    if path in paths:
        documented = [paths[path]]
    else:
        documented = [
            ops
            for template, ops in paths.items()
            if "{" in template and re.fullmatch(re.sub(r"\{[^/}]+\}", "[^/]+", template), path)
        ]
    allowed = {m.upper() for ops in documented for m in ops}
    if not allowed:
        routes = request.app.router.routes
        allowed = {
            m for m in HTTP_METHODS if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)
        }
    return ", ".join(m for m in HTTP_METHODS if m in allowed)


async def _http_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    body = problem_for_status(exc.status_code, detail=detail, instance=request.url.path)
    if detail == body["title"]:  # the framework's default detail is the reason phrase: say it once
        del body["detail"]
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return _as_response(body, headers)


async def _data_error(request: Request, exc: Exception) -> ProblemResponse:
    """The database refused a value (e.g. a NUL byte in text on PostgreSQL): the input was bad."""
    log.info("database rejected a value on %s: %s", request.url.path, exc)
    err = InvalidInput("A value in the request was rejected by the database")
    return _as_response(problem_from_error(err, instance=request.url.path))


class UnexpectedErrorMiddleware:
    """Turns an exception nothing else handled into a 500 problem (logged with its traceback)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def _send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception as exc:
            if started:
                log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                raise
            response = environment_problem(exc, scope.get("path"))
            if response is None:
                log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                response = _as_response(
                    problem_for_status(500, detail="An unexpected error occurred", instance=scope.get("path"))
                )
            await response(scope, receive, send)


def environment_problem(exc: BaseException, instance: str | None) -> ProblemResponse | None:
    """A problem for failures of the environment rather than of the request, or None: the database unreachable
    (a restart: 503 with Retry-After, the client tries again) and a full disk (507)."""
    if is_transient_db_error(exc):
        log.warning("database unreachable on %s: %s", instance, exc)
        body = problem_for_status(503, detail="The database is unavailable; retry shortly", instance=instance)
        return _as_response(body, {"Retry-After": "5"})
    if no_space_error(exc) is not None:
        log.error("storage full on %s: %s", instance, exc)
        err = StorageFull("The server has no storage space left; retry later")
        return _as_response(problem_from_error(err, instance=instance))
    return None


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ArboristError, _arborist_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_middleware(UnexpectedErrorMiddleware)


# --- OpenAPI: document problems --------------------------------------------------------------------------------


def _problem_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def install_problem_openapi(app: FastAPI) -> None:
    """Every operation documents its 422 and any other error (``default``) as a Problem."""
    from api.document import parameters_as_sent
    from api.schemas import Problem

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
        parameters_as_sent(schema)  # optional parameters are absent, never JSON null (api.document)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for path_item in schema.get("paths", {}).values():
            for op in path_item.values():
                if not isinstance(op, dict) or "responses" not in op:
                    continue
                responses = op["responses"]
                if "422" in responses:
                    responses["422"] = _problem_response("Validation error")
                responses.setdefault("default", _problem_response("Error"))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
