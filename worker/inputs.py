"""A job's inputs for a run: its spec, model and data, loaded from the store and checked against each other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from core.errors import InvalidInput, NotFound
from core.io.data import Dataset, check_compatible, load_dataset
from core.io.data.text import TEXT_FORMATS
from core.io.model_files import load_model
from core.io.uris import local_path
from core.runs.hf_job import load_hf_job
from core.runs.onnx_job import bind_named_inputs, load_onnx_text_job
from core.runs.spec import PruneSpec
from core.service.artifacts import ArtifactStore
from core.service.db import attempts
from core.service.db.tables import Job
from core.service.settings import Settings
from worker.db import Database


def load_inputs(db: Database, store: ArtifactStore, settings: Settings, job: Job) -> tuple[PruneSpec, Any, Dataset]:
    """The job's spec, model and data, checked against each other; bad inputs raise ``ArboristError``."""
    try:
        spec = PruneSpec.model_validate(job.spec)
    except ValidationError as exc:
        raise InvalidInput(
            "the stored spec is no longer valid",
            errors=[{"loc": ["spec", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()],
        ) from None
    if job.model_id is None or job.dataset_id is None:
        raise InvalidInput("the job's model or dataset was deleted")
    model_row, ds_row = db.call(lambda s: attempts.job_inputs(session=s, job=job), what="load input rows")
    if model_row.format == "huggingface":
        return _hf_inputs(store, settings, spec, model_row, ds_row, load_hf_job)
    if model_row.format == "onnx" and ds_row.format in TEXT_FORMATS:  # pre-tokenized data (core.runs.onnx_job)
        return _hf_inputs(store, settings, spec, model_row, ds_row, load_onnx_text_job)
    try:
        with store.materialize(model_row.path) as path:
            model = load_model(path, model_row.format, arch=model_row.arch, arch_kwargs=model_row.arch_kwargs)
        if ds_row.path:
            with store.materialize(ds_row.path) as path:
                data = load_dataset(path, ds_row.format)
        else:
            data = load_dataset(
                ds_row.uri,
                ds_row.format,
                allowed_roots=settings.data_allowed_roots,
                max_bytes=settings.max_upload_bytes,
            )
    except FileNotFoundError as exc:
        raise NotFound(f"a stored input of the job is missing: {exc.filename or exc}") from None
    model = bind_named_inputs(model, data)  # an ONNX graph of several named inputs (core.runs.onnx_job)
    check_compatible(model, data, spec.loss.value)
    return spec, model, data


def _hf_inputs(
    store: ArtifactStore, settings: Settings, spec: PruneSpec, model_row, ds_row, load_job: Callable
) -> tuple[PruneSpec, Any, Dataset]:
    """A job on a text dataset: a Hugging Face archive (``core.runs.hf_job``) or an ONNX transformer with
    pre-tokenized rows (``core.runs.onnx_job``)."""
    try:
        with store.materialize(model_row.path) as model_path:
            if ds_row.path:
                with store.materialize(ds_row.path) as data_path:
                    spec, model, data = load_job(spec, model_path, data_path, ds_row.format)
            else:
                with local_path(ds_row.uri, settings.data_allowed_roots, settings.max_upload_bytes) as data_path:
                    spec, model, data = load_job(spec, model_path, data_path, ds_row.format)
    except FileNotFoundError as exc:
        raise NotFound(f"a stored input of the job is missing: {exc.filename or exc}") from None
    check_compatible(model, data, spec.loss.value)
    return spec, model, data
