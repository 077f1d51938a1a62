"""/v1/models: upload (streamed, validated by core.io.model_files before the row exists), list, get, delete."""

from __future__ import annotations

import importlib
from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep, release_connection
from api.isolation import run_isolated
from api.routers._common import (
    CursorQuery,
    LimitQuery,
    default_name,
    form_json_object,
    form_text,
    reject_unknown_fields,
)
from api.routing import JSONBodyRoute
from api.schemas import ModelPublic, ModelsPublic
from api.uploads import MultipartUpload, receive_upload
from core.service.artifacts import ArtifactStore
from core.service.db import crud
from core.service.db.models import Model, Tenant, new_id

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=JSONBodyRoute)

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": "safetensors state dict or ONNX model (pickles are refused)"},
                        "name": {"type": "string", "maxLength": 200},
                        "arch": {"type": "string", "maxLength": 100,
                                 "description": "core.io.zoo architecture for safetensors weights, e.g. 'mlp'"},
                        "arch_kwargs": {"type": "string", "description": "JSON object of architecture arguments"},
                    },
                }
            }
        },
    }
}
FORM_FIELDS = ("name", "arch", "arch_kwargs")
LOCATION = {"Location": {"description": "URL of the new resource", "schema": {"type": "string"}}}


def _register(
    session: Session, store: ArtifactStore, tenant: Tenant, upload: MultipartUpload, fields: dict[str, Any]
) -> Model:
    """Detects and validates the staged file, moves it into place, inserts the row; undoes all on failure."""
    assert upload.file is not None
    model_io = importlib.import_module("core.io.model_files")
    staging, final = upload.file.key, None
    try:
        with store.materialize(staging) as path:
            fmt = model_io.detect_format(path)
            info = run_isolated(model_io.validate_model_file, path, fmt, arch=fields["arch"],
                                arch_kwargs=fields["arch_kwargs"])
        model_id = new_id("mdl")
        final = f"models/{tenant.id}/{model_id}.{info.format}"
        store.move(staging, final)
        return crud.create_model(
            session=session,
            tenant=tenant,
            id=model_id,
            name=fields["name"],
            format=info.format,
            arch=info.arch,
            arch_kwargs=fields["arch_kwargs"] if info.arch else None,
            size=upload.file.size,
            sha256=upload.file.sha256,
            path=final,
            num_parameters=info.num_parameters,
        )
    except BaseException:
        session.rollback()
        store.delete(staging)
        if final is not None:
            store.delete(final)
        raise


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelPublic,
    openapi_extra=UPLOAD_BODY,
    responses={201: {"headers": LOCATION}},
    summary="Upload a model (multipart: file, name, arch, arch_kwargs)",
)
async def upload_model(
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    store: StoreDep,
    settings: SettingsDep,
) -> ModelPublic:
    await release_connection(session)  # the body may take minutes to arrive
    upload = await receive_upload(
        request, store=store, staging_prefix=f"staging/{tenant.id}", max_bytes=settings.max_upload_bytes
    )
    assert upload.file is not None
    try:
        reject_unknown_fields(upload.fields, FORM_FIELDS)
        fields = {
            "name": form_text(upload.fields, "name", max_length=200) or default_name(upload.file.filename, "model"),
            "arch": form_text(upload.fields, "arch", max_length=100),
            "arch_kwargs": form_json_object(upload.fields, "arch_kwargs"),
        }
    except BaseException:
        store.delete(upload.file.key)
        raise
    row = await run_in_threadpool(_register, session, store, tenant, upload, fields)
    response.headers["Location"] = f"/v1/models/{row.id}"
    return ModelPublic.model_validate(row)


@router.get("", response_model=ModelsPublic)
def list_models(
    session: SessionDep, tenant: CurrentTenant, limit: int = LimitQuery, cursor: str | None = CursorQuery
) -> ModelsPublic:
    page = crud.list_models(session=session, tenant=tenant, limit=limit, cursor=cursor)
    return ModelsPublic(data=[ModelPublic.model_validate(m) for m in page.items], count=page.count,
                        next_cursor=page.next_cursor)


@router.get("/{model_id}", response_model=ModelPublic)
def get_model(model_id: str, session: SessionDep, tenant: CurrentTenant) -> ModelPublic:
    return ModelPublic.model_validate(crud.get_model(session=session, tenant=tenant, model_id=model_id))


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def delete_model(model_id: str, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> Response:
    row = crud.delete_model(session=session, tenant=tenant, model_id=model_id)
    store.delete(row.path)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
