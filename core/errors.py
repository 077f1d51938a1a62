"""Domain errors. Each carries what an RFC 9457 problem needs; the edges only translate them."""

from __future__ import annotations

import errno


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
