"""Every error of the service, and its RFC 9457 problem document.

Each error carries a stable ``type`` slug, a ``title`` and the HTTP ``status`` it maps to; ``problem_from_error``
is the one converter to a problem document. The API renders it as ``application/problem+json``, the worker
stores the same dict in ``Job.error``. Nothing here imports anything but the standard library.
"""

from __future__ import annotations

import errno
from typing import Any


class ArboristError(Exception):
    """Base domain error: ``type`` is a stable slug, ``status`` the HTTP status the API maps it to."""

    type = "about:blank"
    title = "Error"
    status = 400

    def __init__(self, detail: str, *, errors: list[dict] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class InvalidInput(ArboristError):
    """A user input (file, URI, spec) is malformed or inconsistent."""

    type = "invalid-input"
    title = "Invalid input"
    status = 422


class UnsafeFormat(InvalidInput):
    """An upload in a format that would execute code when loaded (pickle, TorchScript, torch.export)."""

    type = "unsafe-format"
    title = "Unsafe file format refused"
    status = 415


class TooLarge(ArboristError):
    type = "too-large"
    title = "Payload too large"
    status = 413


class Forbidden(ArboristError):
    """E.g. a data URI outside the allowed roots."""

    type = "forbidden-location"
    title = "Location not allowed"
    status = 403


class DoesNotFit(ArboristError):
    """The memory plan exceeds the budget."""

    type = "memory-budget-exceeded"
    title = "Run does not fit the memory budget"
    status = 422


class Canceled(ArboristError):
    type = "canceled"
    title = "Run canceled"
    status = 409


class StorageFull(ArboristError):
    """A write ran out of space (``ENOSPC``/``EDQUOT``) on the artifact store or a scratch disk. Nothing is
    retried automatically: the space has to be freed first (then a retried job resumes from its checkpoint)."""

    type = "storage-full"
    title = "Not enough storage space"
    status = 507


#: errno values that mean "the disk (or the quota) is full"
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "storagefull")


def no_space_error(exc: BaseException | None) -> BaseException | None:
    """The exception in ``exc``'s chain (itself, its ``__cause__``/``__context__``) that reports a full disk or
    quota, or ``None``. Libraries that wrap the ``OSError`` (safetensors raises ``SafetensorError('... No space
    left on device (os error 28)')``) are recognized by their message."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return exc
        if any(text in str(exc).lower() for text in _NO_SPACE_TEXT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# -- service errors ---------------------------------------------------------------------------

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


# -- job failures (not caused by the inputs) ---------------------------------------------------


class WorkerLost(ArboristError):
    """The job's worker stopped heartbeating (killed, crashed, lost its host) once too often."""

    type = "worker-lost"
    title = "The job's worker was lost"
    status = 503


class TimeLimitExceeded(ArboristError):
    type = "time-limit-exceeded"
    title = "Job time limit exceeded"
    status = 504


class InternalError(ArboristError):
    """An unexpected exception in the run: a bug, or an environment problem (disk full, CUDA error)."""

    type = "internal-error"
    title = "Internal error while running the job"
    status = 500


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
