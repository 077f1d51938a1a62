"""Registering a Hugging Face model by location: a folder (or its archive) under the allowed roots.

The folder is packed into a zip (regular files only: ``core.io.hf.archive.pack_folder``) in a temporary directory,
validated in the isolated child exactly as an upload (``api.isolation``), stored under its final key and its row
inserted; any failure removes the stored file and rolls the session back.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem
from sqlalchemy.orm import Session

from api.forms import default_name
from api.isolation import memory_limit, run_isolated
from api.schemas import ModelRegister
from core.errors import InvalidInput
from core.io.hf.archive import ArchiveLimits, pack_folder
from core.io.hf.validate import HF_FORMAT, validate_model_upload
from core.io.limits import LoadLimits
from core.io.uris import resolve_uri
from core.service.artifacts import ArtifactStore
from core.service.db import inputs
from core.service.db.tables import Model, Tenant, new_id
from core.service.settings import Settings


def _where(detail: str) -> InvalidInput:
    return InvalidInput(detail, errors=[{"loc": ["body", "uri"], "msg": detail, "type": "value_error"}])


def register_model_uri(
    session: Session, store: ArtifactStore, tenant: Tenant, settings: Settings, body: ModelRegister, limits: LoadLimits
) -> Model:
    """The model at ``body.uri`` registered (see the module docstring). Blocking."""
    fs, path = resolve_uri(body.uri, settings.data_allowed_roots)
    if not isinstance(fs, LocalFileSystem):
        raise _where("models are registered from local folders under the allowed roots (upload other models)")
    model_id = new_id("mdl")
    final = f"models/{tenant.id}/{model_id}.{HF_FORMAT}"
    with tempfile.TemporaryDirectory(prefix="arborist-mdl-") as tmp:
        if os.path.isdir(path):
            archive = pack_folder(path, Path(tmp) / "model.zip", ArchiveLimits.of(limits))
        elif os.path.isfile(path):
            archive = Path(path)
        else:
            raise _where(f"{body.uri} is neither a folder nor a file")
        limit = memory_limit(settings, os.path.getsize(archive))
        info = run_isolated(validate_model_upload, archive, HF_FORMAT, limits=limits, memory_limit=limit)
        try:
            size, sha256 = store.put_file(final, archive)
            return inputs.create_model(
                session=session,
                tenant=tenant,
                id=model_id,
                name=body.name or default_name(path, "model", ["body", "uri"]),
                format=info.format,
                arch=info.arch,
                arch_kwargs=getattr(info, "details", None),
                size=size,
                sha256=sha256,
                path=final,
                num_parameters=info.num_parameters,
            )
        except BaseException:
            session.rollback()
            store.delete(final)
            raise
