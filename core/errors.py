"""Domain errors. Each carries what an RFC 9457 problem needs; the edges only translate them."""

from __future__ import annotations


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
