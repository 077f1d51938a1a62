"""/v1/models: upload (streamed, validated by core.io.model_files before the row exists), list, get, delete."""

from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep, release_connection
from api.forms import form_json_object, form_text, input_name
from api.model_uris import register_model_uri
from api.registration import Registration, register_upload, upload_openapi
from api.routers._common import CREATED
from api.routers._inputs import add_input_routes
from api.routing import JSONBodyRoute, is_json_media_type, read_json_body
from api.schemas import ModelPublic, ModelRegister, ModelsPublic
from api.uploads import UploadedFile
from core.io.hf.validate import HFModelInfo, validate_model_upload
from core.io.limits import LoadLimits
from core.io.model_files import ModelInfo
from core.service.db import inputs
from core.service.db.tables import Model, Tenant, new_id
from core.service.names import NAME_FIELD
from core.service.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=JSONBodyRoute)

#: the upload's text fields, as documented
FORM_FIELDS: dict[str, Any] = {
    "name": NAME_FIELD,
    "arch": {
        "type": "string",
        "maxLength": 100,
        "description": "core.io.zoo architecture for safetensors weights, e.g. 'mlp'",
    },
    "arch_kwargs": {"type": "string", "description": "JSON object of architecture arguments"},
}
UPLOAD_BODY = upload_openapi(
    "safetensors state dict, ONNX model, or a .zip / .tar.gz of a Hugging Face model folder (pickles are refused)",
    FORM_FIELDS,
    ModelRegister.model_json_schema(),
)


def load_limits(settings: Settings) -> LoadLimits:
    """What an uploaded model may become once loaded, from the settings."""
    return LoadLimits(
        max_parameters=settings.max_model_parameters,
        max_constant_elements=settings.max_constant_elements,
        max_archive_files=settings.max_archive_files,
        max_archive_bytes=settings.max_archive_bytes,
    )


def _registration(
    session: Session,
    tenant: Tenant,
    limits: LoadLimits,
    detected: dict,
    fields: dict[str, str],
    file: UploadedFile,
) -> Registration[ModelInfo | HFModelInfo, Model]:
    """The model the form fields describe: its file loaded as a run would (``validate_model_file``, within
    ``limits``, in the validation child), its row; what the child found beyond the row goes into ``detected``."""
    name = input_name(fields, file.filename, "model")
    arch = form_text(fields, "arch", max_length=100)
    arch_kwargs = form_json_object(fields, "arch_kwargs")
    model_id = new_id("mdl")

    def insert(info: ModelInfo | HFModelInfo, path: str) -> Model:
        detected["tensor_names"] = getattr(info, "tensor_names", None)
        hf = info.details if isinstance(info, HFModelInfo) else None  # what the archive was found to hold
        return inputs.create_model(
            session=session,
            tenant=tenant,
            id=model_id,
            name=name,
            format=info.format,
            arch=info.arch,
            arch_kwargs=hf if hf is not None else (arch_kwargs if info.arch else None),
            size=file.size,
            sha256=file.sha256,
            path=path,
            num_parameters=info.num_parameters,
        )

    return Registration(
        partial(validate_model_upload, arch=arch, arch_kwargs=arch_kwargs, limits=limits),
        f"models/{tenant.id}/{model_id}",
        insert,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelPublic,
    openapi_extra=UPLOAD_BODY,
    responses=CREATED,
    summary="Upload a model (multipart: file, name, arch, arch_kwargs) or register a Hugging Face folder (JSON {uri})",
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
    if is_json_media_type(request.headers.get("content-type")):  # a Hugging Face folder under the allowed roots
        raw = await read_json_body(request, settings.max_json_bytes)
        try:
            body = ModelRegister.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            ) from None
        row = await run_in_threadpool(register_model_uri, session, store, tenant, settings, body, load_limits(settings))
        response.headers["Location"] = f"/v1/models/{row.id}"
        return ModelPublic.of(row)
    row = await register_upload(
        request,
        session=session,
        store=store,
        tenant=tenant,
        max_bytes=settings.max_upload_bytes,
        form_fields=FORM_FIELDS,
        plan=partial(_registration, session, tenant, load_limits(settings), detected := {}),
    )
    response.headers["Location"] = f"/v1/models/{row.id}"
    return ModelPublic.of(row).model_copy(update={"tensor_names": detected.get("tensor_names")})


add_input_routes(router, Model, ModelPublic, ModelsPublic)
