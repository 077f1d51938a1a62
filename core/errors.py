"""Every error of the service, and the one converter to an RFC 9457 problem document.

Each error class carries a stable ``type`` slug, a ``title`` and the HTTP ``status`` it maps to. They come in
three groups: input errors (the request, its files or its spec are wrong), service errors (the request is
sound but the service refuses or cannot serve it now) and job failures (a job ended without a result, not
because of its inputs). ``problem_from_error`` turns an error into its problem document and
``problem_for_status`` does the same for a bare HTTP status (an error the web framework raises); the API sends
these as ``application/problem+json``, the worker stores the same dict in ``Job.error``.

Imported by every layer, so it imports nothing but the standard library.
"""

from __future__ import annotations

import errno
from http import HTTPStatus
from typing import Any

#: a slug's ``type`` URI is this plus the slug
PROBLEM_BASE = "https://arborist.dev/problems/"


class ArboristError(Exception):
    """Base domain error: ``type`` is a stable slug, ``status`` the HTTP status the API maps it to."""

    type = "about:blank"
    title = "Error"
    status = 400

    def __init__(self, detail: str, *, errors: list[dict] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


# -- input errors -----------------------------------------------------------------------------


class InvalidInput(ArboristError):
    """A user input (file, URI, spec) is malformed or inconsistent."""

    type = "invalid-input"
    title = "Invalid input"
    status = 422


class InvalidRequest(InvalidInput):
    """A request's body, query or path parameters fail their schema; ``errors`` lists the fields."""

    type = "validation-error"
    title = "Request validation failed"


class UnsupportedMediaType(ArboristError):
    """A request body of a media type the endpoint does not take."""

    type = "unsupported-media-type"
    title = "Unsupported media type"
    status = 415


class UnsafeFormat(UnsupportedMediaType):
    """An upload in a format that would execute code when loaded (pickle, TorchScript, torch.export)."""

    type = "unsafe-format"
    title = "Unsafe file format refused"


class TooLarge(ArboristError):
    """A request body or file over its size limit."""

    type = "too-large"
    title = "Payload too large"
    status = 413


class LimitExceeded(TooLarge):
    """An input, small as it may be, that would take more than a configured limit once loaded: an ONNX graph
    that builds huge constants, an architecture with too many parameters, a validation over its memory limit."""

    type = "limit-exceeded"
    title = "Input exceeds a processing limit"


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


class NumericalError(ArboristError):
    """A run's weights, loss or curvature became non-finite (NaN or ±Infinity), or a factorization failed: the
    settings (λ too small, a learning rate too large) or the model's scale do not suit the data. The detail says
    where (which step, which layer) and what to change."""

    type = "numerical-error"
    title = "The run's numbers became non-finite"
    status = 422


class IdempotencyMismatch(ArboristError):
    """An Idempotency-Key sent again with a different request body."""

    type = "idempotency-key-reused"
    title = "Idempotency-Key reused with a different request"
    status = 422


# -- service errors ---------------------------------------------------------------------------


class Unauthorized(ArboristError):
    """No API key, or one that is malformed, unknown or revoked."""

    type = "unauthorized"
    title = "Authentication required"
    status = 401


class NotFound(ArboristError):
    """No such resource for this tenant (another tenant's resources are not found either)."""

    type = "not-found"
    title = "Resource not found"
    status = 404


class Conflict(ArboristError):
    """The resource's current state forbids the request (e.g. deleting a model an active job uses)."""

    type = "conflict"
    title = "Conflict with the resource's state"
    status = 409


class ServiceUnavailable(ArboristError):
    """A dependency (database, queue) cannot be reached, or the server is saturated; the client retries after
    ``retry_after_s`` seconds (the API sends it as Retry-After)."""

    type = "service-unavailable"
    title = "Service unavailable"
    status = 503

    def __init__(self, detail: str, *, retry_after_s: int = 5, errors: list[dict] | None = None):
        super().__init__(detail, errors=errors)
        self.retry_after_s = retry_after_s


class QuotaExceeded(ArboristError):
    """A tenant limit (running or queued jobs, stored bytes, requests per second) is reached: nothing was done; the
    client retries after ``retry_after_s`` seconds (Retry-After). ``limit`` names the limit, its value and the
    tenant's current use (in the problem body)."""

    type = "too-many-requests"
    title = "Tenant limit reached"
    status = 429

    def __init__(self, detail: str, *, limit: dict[str, Any], retry_after_s: int = 1):
        super().__init__(detail)
        self.limit = limit
        self.retry_after_s = retry_after_s


class ClientClosedRequest(ArboristError):
    """The client closed its connection (it gave up waiting) before the request took effect, so nothing was done.
    Nobody reads the answer: its status (499, as nginx logs it) is for the logs and metrics."""

    type = "client-closed-request"
    title = "Client closed the request"
    status = 499


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


#: how allocators that do not raise ``MemoryError`` say that an allocation failed (torch's CPU allocator raises
#: ``RuntimeError('... DefaultCPUAllocator: can't allocate memory ...')``, C++ ``std::bad_alloc``)
_NO_MEMORY_TEXT = ("can't allocate memory", "cannot allocate memory", "std::bad_alloc", "out of memory")


def out_of_memory_error(exc: BaseException | None) -> BaseException | None:
    """The exception in ``exc``'s chain that reports a failed allocation (a ``MemoryError``, or an allocator's
    error recognized by its message), or ``None``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError) or any(text in str(exc).lower() for text in _NO_MEMORY_TEXT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# -- job failures (not caused by the inputs) ---------------------------------------------------


class Canceled(ArboristError):
    """The job was canceled by its owner."""

    type = "canceled"
    title = "Run canceled"
    status = 409


class WorkerLost(ArboristError):
    """The job's worker stopped heartbeating (killed, crashed, lost its host) once too often."""

    type = "worker-lost"
    title = "The job's worker was lost"
    status = 503


class TimeLimitExceeded(ArboristError):
    """The run took longer than the job's time limit."""

    type = "time-limit-exceeded"
    title = "Job time limit exceeded"
    status = 504


class InternalError(ArboristError):
    """An unexpected exception in the run: a bug, or an environment problem (disk full, CUDA error)."""

    type = "internal-error"
    title = "Internal error while running the job"
    status = 500


# -- problem documents ------------------------------------------------------------------------

#: the problem type of a bare HTTP status; statuses not listed are ``about:blank``
STATUS_TYPES: dict[int, str] = {
    400: "bad-request",
    401: Unauthorized.type,
    403: "forbidden",
    404: NotFound.type,
    405: "method-not-allowed",
    406: "not-acceptable",
    409: Conflict.type,
    411: "length-required",
    413: TooLarge.type,
    415: UnsupportedMediaType.type,
    422: InvalidInput.type,
    429: QuotaExceeded.type,
    500: InternalError.type,
    503: ServiceUnavailable.type,
}


def _problem(
    slug: str,
    title: str,
    status: int,
    detail: str | None,
    instance: str | None,
    errors: list[dict],
    extra: dict[str, Any],
) -> dict[str, Any]:
    uri = slug if slug == "about:blank" or "://" in slug else PROBLEM_BASE + slug
    body: dict[str, Any] = {"type": uri, "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    if errors:
        body["errors"] = errors
    body.update(extra)
    return body


def problem_from_error(exc: ArboristError, *, instance: str | None = None, **extra: Any) -> dict[str, Any]:
    """The problem document for a domain error (``errors`` only when it has some; ``extra`` members added)."""
    return _problem(exc.type, exc.title, exc.status, exc.detail, instance, exc.errors, extra)


def problem_for_status(status: int, *, detail: str | None = None, instance: str | None = None) -> dict[str, Any]:
    """The problem document for a bare HTTP status: its type from ``STATUS_TYPES``, its reason phrase as title."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return _problem(STATUS_TYPES.get(status, "about:blank"), title, status, detail, instance, [], {})
