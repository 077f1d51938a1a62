"""/v1/datasets: upload a file (npz / safetensors / parquet, streamed) or register a URI under an allowed root."""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep, release_connection
from api.isolation import run_isolated
from api.routers._common import CursorQuery, LimitQuery, default_name, form_text, reject_unknown_fields
from api.routers.models import LOCATION
from api.routing import JSONBodyRoute, is_json_media_type, read_json_body
from api.schemas import DatasetPublic, DatasetRegister, DatasetsPublic
from api.uploads import MultipartUpload, is_multipart, receive_upload
from core.service.artifacts import CHUNK, ArtifactStore
from core.service.db import crud
from core.service.db.models import Dataset, Tenant, new_id
from core.errors import InvalidInput
from core.errors import UnsupportedMediaType
from core.service.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], route_class=JSONBodyRoute)

FORMATS = ("npz", "safetensors", "parquet")

CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "npz, safetensors or parquet"},
                        "name": {"type": "string", "maxLength": 200},
                        "format": {"type": "string", "enum": list(FORMATS)},
                    },
                }
            },
            "application/json": {"schema": DatasetRegister.model_json_schema()},
        },
    }
}


def _format_field(fields: dict[str, str]) -> str | None:
    fmt = form_text(fields, "format", max_length=32)
    if fmt is not None and fmt not in FORMATS:
        raise InvalidInput(
            f"format must be one of {', '.join(FORMATS)}",
            errors=[{"loc": ["body", "format"], "msg": f"one of {', '.join(FORMATS)}", "type": "enum"}],
        )
    return fmt


def _register_upload(
    session: Session, store: ArtifactStore, tenant: Tenant, upload: MultipartUpload, name: str, fmt: str | None
) -> Dataset:
    assert upload.file is not None
    data = importlib.import_module("core.io.data")
    staging, final = upload.file.key, None
    try:
        with store.materialize(staging) as path:
            info = run_isolated(data.validate_dataset_file, path, fmt)
        dataset_id = new_id("ds")
        final = f"datasets/{tenant.id}/{dataset_id}.{info.format}"
        store.move(staging, final)
        return crud.create_dataset(
            session=session, tenant=tenant, id=dataset_id, name=name, format=info.format, path=final,
            size=upload.file.size, sha256=upload.file.sha256, num_examples=info.num_examples,
            input_shape=list(info.input_shape), num_classes=info.num_classes, has_val=info.has_val,
        )
    except BaseException:
        session.rollback()
        store.delete(staging)
        if final is not None:
            store.delete(final)
        raise


def _hash_file(path: str | Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _register_uri(session: Session, tenant: Tenant, settings: Settings, body: DatasetRegister) -> Dataset:
    uris = importlib.import_module("core.io.uris")
    data = importlib.import_module("core.io.data")
    fs, path = uris.resolve_uri(body.uri, settings.data_allowed_roots)
    if isinstance(fs, LocalFileSystem):
        if not os.path.isfile(path):
            raise InvalidInput(f"{body.uri} is not a file",
                               errors=[{"loc": ["body", "uri"], "msg": "not a file", "type": "value_error"}])
        info = run_isolated(data.validate_dataset_file, path, body.format)
        size, sha256 = _hash_file(path)
        uri = Path(path).as_uri()
    else:
        with tempfile.TemporaryDirectory(prefix="arborist-ds-") as tmp:
            local = uris.fetch_to_local(body.uri, settings.data_allowed_roots, tmp, settings.max_upload_bytes)
            info = run_isolated(data.validate_dataset_file, local, body.format)
            size, sha256 = _hash_file(local)
        uri = body.uri
    name = body.name or default_name(path, "dataset")
    return crud.create_dataset(
        session=session, tenant=tenant, name=name, format=info.format, uri=uri, size=size, sha256=sha256,
        num_examples=info.num_examples, input_shape=list(info.input_shape), num_classes=info.num_classes,
        has_val=info.has_val,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    openapi_extra=CREATE_BODY,
    responses={201: {"headers": LOCATION}},
    summary="Upload a dataset (multipart) or register a URI (JSON {uri, name?, format?})",
)
async def create_dataset(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    store: StoreDep,
    settings: SettingsDep,
) -> DatasetPublic:
    await release_connection(session)  # an upload (or a remote URI's fetch) may take minutes
    content_type = request.headers.get("content-type")
    if is_json_media_type(content_type):
        raw = await read_json_body(request, settings.max_json_bytes)
        try:
            body = DatasetRegister.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            ) from None
        row = await run_in_threadpool(_register_uri, session, tenant, settings, body)
    elif is_multipart(content_type):
        upload = await receive_upload(
            request, store=store, staging_prefix=f"staging/{tenant.id}", max_bytes=settings.max_upload_bytes
        )
        assert upload.file is not None
        try:
            reject_unknown_fields(upload.fields, ("name", "format"))
            name = form_text(upload.fields, "name", max_length=200) or default_name(upload.file.filename, "dataset")
            fmt = _format_field(upload.fields)
        except BaseException:
            store.delete(upload.file.key)
            raise
        row = await run_in_threadpool(_register_upload, session, store, tenant, upload, name, fmt)
    else:
        raise UnsupportedMediaType("Expected multipart/form-data (upload) or application/json (register a URI)")
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return DatasetPublic.of(row)


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    session: SessionDep, tenant: CurrentTenant, limit: int = LimitQuery, cursor: str | None = CursorQuery
) -> DatasetsPublic:
    page = crud.list_datasets(session=session, tenant=tenant, limit=limit, cursor=cursor)
    return DatasetsPublic(data=[DatasetPublic.of(d) for d in page.items], count=page.count,
                          next_cursor=page.next_cursor)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant) -> DatasetPublic:
    return DatasetPublic.of(crud.get_dataset(session=session, tenant=tenant, dataset_id=dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def delete_dataset(dataset_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> Response:
    row = crud.delete_dataset(session=session, tenant=tenant, dataset_id=dataset_id)
    if row.path:
        store.delete(row.path)  # registered URIs are the user's files: never deleted
    return Response(status_code=status.HTTP_204_NO_CONTENT)
