"""RFC 9457 problem documents built from domain errors, plus the errors the service layer adds.

The API renders these as ``application/problem+json``; the worker stores the same dict in ``Job.error``.
"""

from __future__ import annotations

from typing import Any

from core.errors import ArboristError

PROBLEM_BASE = "https://arborist.dev/problems/"


def problem_type(slug: str) -> str:
    """The stable ``type`` URI for a slug (``about:blank`` and absolute URIs pass through)."""
    if slug == "about:blank" or "://" in slug:
        return slug
    return PROBLEM_BASE + slug


class NotFound(ArboristError):
    type = "not-found"
    title = "Resource not found"
    status = 404


class Conflict(ArboristError):
    """The resource's current state forbids the request (e.g. deleting a model an active job uses)."""

    type = "conflict"
    title = "Conflict with the resource's state"
    status = 409


class IdempotencyMismatch(ArboristError):
    type = "idempotency-key-reused"
    title = "Idempotency-Key reused with a different request"
    status = 422


class Unauthorized(ArboristError):
    type = "unauthorized"
    title = "Authentication required"
    status = 401


class UnsupportedMediaType(ArboristError):
    type = "unsupported-media-type"
    title = "Unsupported media type"
    status = 415


class ServiceUnavailable(ArboristError):
    type = "service-unavailable"
    title = "Service unavailable"
    status = 503


def problem_from_error(exc: ArboristError, *, instance: str | None = None, **extra: Any) -> dict[str, Any]:
    """The problem document for a domain error (``errors`` only when it has some)."""
    body: dict[str, Any] = {
        "type": problem_type(exc.type),
        "title": exc.title,
        "status": exc.status,
        "detail": exc.detail,
    }
    if instance is not None:
        body["instance"] = instance
    if exc.errors:
        body["errors"] = exc.errors
    body.update(extra)
    return body
