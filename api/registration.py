"""Registering an uploaded file: the one pipeline behind model and dataset uploads.

The multipart upload is streamed to a staging key (``api.uploads``) and its form fields read; the staged file is
then validated in a child process of its own (``api.isolation``: every byte of it is parsed there, none in the
API process; its memory limited by ``Settings.validation_memory_mb``), moved to its final key, and its row inserted.
On any failure (bad form fields, an invalid file, a full disk, a database error) the session is rolled back and
the staged and final files are deleted: nothing half-registered remains. ``upload_openapi`` documents such a
request body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from api.deps import get_settings
from api.forms import reject_unknown_fields
from api.isolation import memory_limit, run_isolated
from api.uploads import UploadedFile, receive_upload
from core.service.artifacts import STAGING, ArtifactStore


class Validated(Protocol):
    """What a validator returns (``ModelInfo``, ``DatasetInfo``): at least the format it found."""

    @property
    def format(self) -> str: ...


V = TypeVar("V", bound=Validated)
R = TypeVar("R")


@dataclass(frozen=True)
class Registration(Generic[V, R]):
    """How one staged file is registered.

    ``validate(path)`` runs in a child process, so it must pickle (a module-level function, or a
    ``functools.partial`` of one); the file then moves to ``{final_stem}.{format}``, and ``insert(info, key)``
    inserts its row and returns it."""

    validate: Callable[[Path], V]
    final_stem: str
    insert: Callable[[V, str], R]


def upload_openapi(file: str, fields: dict[str, Any], json_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAPI request body of an upload: ``multipart/form-data`` with the ``file`` (described by ``file``)
    and the text ``fields`` (name → JSON schema), or else a JSON body of ``json_schema`` where one is taken."""
    form = {
        "type": "object",
        "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary", "description": file}, **fields},
    }
    content: dict[str, Any] = {"multipart/form-data": {"schema": form}}
    if json_schema is not None:
        content["application/json"] = {"schema": json_schema}
    return {"requestBody": {"required": True, "content": content}}


async def register_upload(
    request: Request,
    *,
    session: Session,
    store: ArtifactStore,
    tenant_id: str,
    max_bytes: int,
    form_fields: Iterable[str],
    plan: Callable[[dict[str, str], UploadedFile], Registration[V, R]],
) -> R:
    """Receives the upload (staged under ``staging/<tenant_id>``; text fields other than ``form_fields`` refused),
    lets ``plan`` read the fields, then registers the file; returns the inserted row."""
    upload = await receive_upload(request, store=store, staging_prefix=f"{STAGING}/{tenant_id}", max_bytes=max_bytes)
    file = upload.file
    assert file is not None
    try:
        reject_unknown_fields(upload.fields, tuple(form_fields))
        registration = plan(upload.fields, file)
    except BaseException:
        store.delete(file.key)
        raise
    limit = memory_limit(get_settings(request), file.size)
    return await run_in_threadpool(_register, session, store, file, registration, limit)


def _register(
    session: Session, store: ArtifactStore, file: UploadedFile, registration: Registration[V, R], limit: int
) -> R:
    """Validates the staged file (in a child that may allocate ``limit`` bytes: ``api.isolation``), moves it into
    place, inserts the row; undoes all on failure. Blocking."""
    staging, final = file.key, None
    try:
        with store.materialize(staging) as path:
            info = run_isolated(registration.validate, path, memory_limit=limit)
        final = f"{registration.final_stem}.{info.format}"
        store.move(staging, final)
        return registration.insert(info, final)
    except BaseException:
        session.rollback()
        store.delete(staging)
        if final is not None:
            store.delete(final)
        raise
