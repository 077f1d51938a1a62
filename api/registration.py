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
from functools import partial
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
from core.service.db import usage
from core.service.db.tables import Tenant
from core.service.limits import TenantLimits, limits_for


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
    tenant: Tenant,
    max_bytes: int,
    form_fields: Iterable[str],
    plan: Callable[[dict[str, str], UploadedFile], Registration[V, R]],
) -> R:
    """Receives the upload (staged under ``staging/<tenant id>``; text fields other than ``form_fields`` refused),
    lets ``plan`` read the fields, then registers the file; returns the inserted row. A tenant at its
    ``stored_bytes`` limit is refused (429) before the body is read, and one that the file would take past it
    after (the staged file deleted)."""
    settings = get_settings(request)
    limits = limits_for(settings, tenant.name)
    if limits.stored_bytes is not None:
        await run_in_threadpool(_precheck, session, tenant, limits)
    upload = await receive_upload(request, store=store, staging_prefix=f"{STAGING}/{tenant.id}", max_bytes=max_bytes)
    file = upload.file
    assert file is not None
    try:
        reject_unknown_fields(upload.fields, tuple(form_fields))
        registration = plan(upload.fields, file)
    except BaseException:
        store.delete(file.key)
        raise
    limit = memory_limit(settings, file.size)
    admit = None if limits.stored_bytes is None else partial(_admit, session, tenant, limits, file.size)
    return await run_in_threadpool(_register, session, store, file, registration, limit, admit)


def _precheck(session: Session, tenant: Tenant, limits: TenantLimits) -> None:
    """Refuses an upload from a tenant already at its stored-bytes limit, before its body is read (no lock)."""
    try:
        usage.admit_bytes(session=session, tenant=tenant, limits=limits, incoming=1)
    finally:
        session.rollback()


def _admit(session: Session, tenant: Tenant, limits: TenantLimits, incoming: int) -> None:
    """Takes the tenant's admission lock (until the row's insert commits) and checks its stored bytes; a refusal
    ends the transaction."""
    try:
        usage.lock_tenant(session, tenant)
        usage.admit_bytes(session=session, tenant=tenant, limits=limits, incoming=incoming)
    except BaseException:
        session.rollback()
        raise


def _register(
    session: Session,
    store: ArtifactStore,
    file: UploadedFile,
    registration: Registration[V, R],
    limit: int,
    admit: Callable[[], None] | None = None,
) -> R:
    """Validates the staged file (in a child that may allocate ``limit`` bytes: ``api.isolation``), moves it into
    place, inserts the row; undoes all on failure. Blocking."""
    staging, final = file.key, None
    try:
        with store.materialize(staging) as path:
            info = run_isolated(registration.validate, path, memory_limit=limit)
        final = f"{registration.final_stem}.{info.format}"
        store.move(staging, final)
        if admit is not None:
            admit()  # the tenant's stored bytes, checked under its lock, which the insert's commit releases
        return registration.insert(info, final)
    except BaseException:
        session.rollback()
        store.delete(staging)
        if final is not None:
            store.delete(final)
        raise
