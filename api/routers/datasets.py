"""/v1/datasets: upload a file (npz / safetensors / parquet, streamed) or register a URI under an allowed root."""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep, release_connection
from api.forms import default_name, form_text, input_name
from api.isolation import memory_limit, run_isolated
from api.registration import Registration, register_upload, upload_openapi
from api.routers._common import CREATED
from api.routers._inputs import add_input_routes
from api.routing import JSONBodyRoute, is_json_media_type, read_json_body
from api.schemas import DatasetPublic, DatasetRegister, DatasetsPublic
from api.uploads import UploadedFile, is_multipart
from core.errors import InvalidInput, UnsupportedMediaType
from core.io.data import DatasetInfo, validate_dataset_file
from core.io.uris import fetch_to_local, resolve_uri
from core.service.artifacts import CHUNK
from core.service.db import inputs
from core.service.db.tables import Dataset, Tenant, new_id
from core.service.names import NAME_FIELD
from core.service.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], route_class=JSONBodyRoute)

FORMATS = ("npz", "safetensors", "parquet", "jsonl", "txt", "text_parquet")
#: the upload's text fields, as documented
FORM_FIELDS: dict[str, Any] = {
    "name": NAME_FIELD,
    "format": {"type": "string", "enum": list(FORMATS)},
}
CREATE_BODY = upload_openapi(
    "npz, safetensors or parquet; text: jsonl, txt or parquet with a text column",
    FORM_FIELDS,
    DatasetRegister.model_json_schema(),
)


def _format_field(fields: dict[str, str]) -> str | None:
    fmt = form_text(fields, "format", max_length=32)
    if fmt is not None and fmt not in FORMATS:
        raise InvalidInput(
            f"format must be one of {', '.join(FORMATS)}",
            errors=[{"loc": ["body", "format"], "msg": f"one of {', '.join(FORMATS)}", "type": "enum"}],
        )
    return fmt


def _registration(
    session: Session, tenant: Tenant, fields: dict[str, str], file: UploadedFile
) -> Registration[DatasetInfo, Dataset]:
    """The dataset the form fields describe: its file loaded as a run would (``validate_dataset_file``), its row."""
    name = input_name(fields, file.filename, "dataset")
    fmt = _format_field(fields)
    dataset_id = new_id("ds")

    def insert(info: DatasetInfo, path: str) -> Dataset:
        return inputs.create_dataset(
            session=session,
            tenant=tenant,
            id=dataset_id,
            name=name,
            format=info.format,
            path=path,
            size=file.size,
            sha256=file.sha256,
            num_examples=info.num_examples,
            input_shape=list(info.input_shape),
            num_classes=info.num_classes,
            has_val=info.has_val,
        )

    return Registration(partial(validate_dataset_file, fmt=fmt), f"datasets/{tenant.id}/{dataset_id}", insert)


def _hash_file(path: str | Path) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _register_uri(session: Session, tenant: Tenant, settings: Settings, body: DatasetRegister) -> Dataset:
    fs, path = resolve_uri(body.uri, settings.data_allowed_roots)
    if isinstance(fs, LocalFileSystem):
        if not os.path.isfile(path):
            raise InvalidInput(
                f"{body.uri} is not a file",
                errors=[{"loc": ["body", "uri"], "msg": "not a file", "type": "value_error"}],
            )
        limit = memory_limit(settings, os.path.getsize(path))
        info = run_isolated(validate_dataset_file, path, body.format, memory_limit=limit)
        size, sha256 = _hash_file(path)
        uri = Path(path).as_uri()
    else:
        with tempfile.TemporaryDirectory(prefix="arborist-ds-") as tmp:
            local = fetch_to_local(body.uri, settings.data_allowed_roots, tmp, settings.max_upload_bytes)
            limit = memory_limit(settings, os.path.getsize(local))
            info = run_isolated(validate_dataset_file, local, body.format, memory_limit=limit)
            size, sha256 = _hash_file(local)
        uri = body.uri
    name = body.name or default_name(path, "dataset", ["body", "uri"])
    return inputs.create_dataset(
        session=session,
        tenant=tenant,
        name=name,
        format=info.format,
        uri=uri,
        size=size,
        sha256=sha256,
        num_examples=info.num_examples,
        input_shape=list(info.input_shape),
        num_classes=info.num_classes,
        has_val=info.has_val,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    openapi_extra=CREATE_BODY,
    responses=CREATED,
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
        row = await register_upload(
            request,
            session=session,
            store=store,
            tenant=tenant,
            max_bytes=settings.max_upload_bytes,
            form_fields=FORM_FIELDS,
            plan=partial(_registration, session, tenant),
        )
    else:
        raise UnsupportedMediaType("Expected multipart/form-data (upload) or application/json (register a URI)")
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return DatasetPublic.of(row)


add_input_routes(router, Dataset, DatasetPublic, DatasetsPublic)
