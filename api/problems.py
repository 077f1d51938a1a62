"""RFC 9457: every error leaves as ``application/problem+json`` with a stable ``type`` URI.

Domain errors (``ArboristError``), request validation errors (with a field list in ``errors``), HTTP errors
raised by the framework and unexpected exceptions (a generic 500, details only in the log) all go through here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.service.db.base import is_transient_db_error
from core.errors import ArboristError, StorageFull, no_space_error
from core.errors import problem_from_error, problem_type

log = logging.getLogger("arborist.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"

HTTP_SLUGS = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    411: "length-required",
    413: "too-large",
    415: "unsupported-media-type",
    422: "invalid-input",
    429: "too-many-requests",
    500: "internal-error",
    503: "service-unavailable",
}


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem(
    status: int,
    *,
    slug: str | None = None,
    title: str | None = None,
    detail: str | None = None,
    instance: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> ProblemResponse:
    body: dict[str, Any] = {
        "type": problem_type(slug or HTTP_SLUGS.get(status, "about:blank")),
        "title": title or _title(status),
        "status": status,
    }
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    if errors:
        body["errors"] = errors
    return ProblemResponse(body, status_code=status, headers=dict(headers or {}))


def _auth_headers(status: int) -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer realm="arborist"'} if status == 401 else {}


async def _arborist_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, ArboristError)
    body = problem_from_error(exc, instance=request.url.path)
    return ProblemResponse(body, status_code=exc.status, headers=_auth_headers(exc.status))


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
        out.append({"loc": _jsonable(list(e.get("loc", ()))), "msg": str(e.get("msg", "")),
                    "type": str(e.get("type", ""))})
    return out


async def _validation_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors(exc.errors())
    first = errors[0] if errors else None
    detail = f"{len(errors)} invalid field(s)"
    if first is not None:
        loc = ".".join(str(p) for p in first["loc"])
        detail += f"; first: {loc}: {first['msg']}"
    return problem(422, slug="validation-error", title="Request validation failed", detail=detail,
                   instance=request.url.path, errors=errors)


async def _http_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    headers.update(_auth_headers(exc.status_code))
    detail = exc.detail if isinstance(exc.detail, str) else None
    if detail == _title(exc.status_code):
        detail = None
    return problem(exc.status_code, detail=detail, instance=request.url.path, headers=headers)


async def _data_error(request: Request, exc: Exception) -> ProblemResponse:
    """The database refused a value (e.g. a NUL byte in text on PostgreSQL): the input was bad."""
    log.info("database rejected a value on %s: %s", request.url.path, exc)
    return problem(422, slug="invalid-input", title="Invalid input",
                   detail="A value in the request was rejected by the database", instance=request.url.path)


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
                response = problem(500, detail="An unexpected error occurred", instance=scope.get("path"))
            await response(scope, receive, send)


def environment_problem(exc: BaseException, instance: str | None) -> ProblemResponse | None:
    """A problem for failures of the environment rather than of the request, or None: the database unreachable
    (a restart: 503 with Retry-After, the client tries again) and a full disk (507)."""
    if is_transient_db_error(exc):
        log.warning("database unreachable on %s: %s", instance, exc)
        return problem(503, detail="The database is unavailable; retry shortly", instance=instance,
                       headers={"Retry-After": "5"})
    if no_space_error(exc) is not None:
        log.error("storage full on %s: %s", instance, exc)
        return problem(507, slug=StorageFull.type, title=StorageFull.title,
                       detail="The server has no storage space left; retry later", instance=instance)
    return None


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ArboristError, _arborist_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_middleware(UnexpectedErrorMiddleware)


# --- OpenAPI: document problems --------------------------------------------------------------------------------


def _problem_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def install_problem_openapi(app: FastAPI) -> None:
    """Every operation documents its 422 and any other error (``default``) as a Problem."""
    from api.schemas import Problem

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description=app.description)
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
