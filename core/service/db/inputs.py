"""A tenant's inputs: model rows and dataset rows (the files are in the artifact store; a registered dataset has
a URI instead).

Both kinds are read, listed and deleted alike: those functions take the table (``Model`` or ``Dataset``) and the
caller's ``tenant``, and another tenant's row is ``NotFound``. ``get_unscoped`` is for the worker, which reads
the inputs of the job it runs (``attempts.job_inputs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from core.errors import Conflict, NotFound
from core.service.db.base import begin_write
from core.service.db.rows import Page, by_id, page
from core.service.db.tables import ACTIVE_STATES, Dataset, Job, Model, Tenant
from core.service.names import check_name

Input = TypeVar("Input", Model, Dataset)

#: the artifact-store folders of uploaded input files (``models/<tenant>/<id>.<format>``, ``datasets/...``)
INPUT_FOLDERS = ("models", "datasets")
#: the job column that refers to each kind of input
_USED_BY = {Model: Job.model_id, Dataset: Job.dataset_id}


def _add(session: Session, row: Input, id: str | None) -> Input:
    check_name(row.name, ["body", "name"])  # the API checked it already; this holds for every other caller too
    if id is not None:
        row.id = id
    session.add(row)
    session.commit()
    return row


def create_model(
    *,
    session: Session,
    tenant: Tenant,
    name: str,
    format: str,
    size: int,
    sha256: str,
    path: str,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    num_parameters: int | None = None,
    id: str | None = None,
) -> Model:
    row = Model(
        tenant_id=tenant.id,
        name=name,
        format=format,
        arch=arch,
        arch_kwargs=arch_kwargs,
        size=size,
        sha256=sha256,
        path=path,
        num_parameters=num_parameters,
    )
    return _add(session, row, id)


def create_dataset(
    *,
    session: Session,
    tenant: Tenant,
    name: str,
    format: str,
    size: int,
    uri: str | None = None,
    path: str | None = None,
    sha256: str | None = None,
    num_examples: int | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    has_val: bool = False,
    id: str | None = None,
) -> Dataset:
    if (uri is None) == (path is None):
        raise ValueError("a dataset has exactly one of uri (registered) or path (uploaded)")
    row = Dataset(
        tenant_id=tenant.id,
        name=name,
        format=format,
        uri=uri,
        path=path,
        size=size,
        sha256=sha256,
        num_examples=num_examples,
        input_shape=list(input_shape) if input_shape is not None else None,
        num_classes=num_classes,
        has_val=has_val,
    )
    return _add(session, row, id)


def _not_found(table: type[Input], id: str) -> NotFound:
    return NotFound(f"{table.__name__} {id!r} not found")


def find(table: type[Input], *, session: Session, tenant: Tenant, id: str, lock: bool = False) -> Input | None:
    """The row if it exists and is ``tenant``'s, else ``None``."""
    row = by_id(session, table, id, lock=lock)
    return row if row is not None and row.tenant_id == tenant.id else None


def missing(*, session: Session, tenant: Tenant, model_id: str, dataset_id: str) -> list[str]:
    """Which of a job's inputs (``"model"``, ``"dataset"``) are not ``tenant``'s rows now: read from the database,
    not from the session's identity map."""
    present = {
        "model": select(Model.id).where(Model.id == model_id, Model.tenant_id == tenant.id),
        "dataset": select(Dataset.id).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant.id),
    }
    return [kind for kind, stmt in present.items() if session.scalar(stmt) is None]


def get(table: type[Input], *, session: Session, tenant: Tenant, id: str) -> Input:
    row = find(table, session=session, tenant=tenant, id=id)
    if row is None:
        raise _not_found(table, id)
    return row


def get_unscoped(table: type[Input], *, session: Session, id: str) -> Input:
    """Any tenant's row: for the worker, which reads the inputs of the job it runs."""
    row = by_id(session, table, id)
    if row is None:
        raise _not_found(table, id)
    return row


def list_page(
    table: type[Input], *, session: Session, tenant: Tenant, limit: int = 50, cursor: str | None = None
) -> Page[Input]:
    return page(session, select(table).where(table.tenant_id == tenant.id), table, limit=limit, cursor=cursor)


def unreferenced(*, session: Session, keys: Sequence[str]) -> set[str]:
    """Which of the artifact-store ``keys`` under ``models/`` or ``datasets/`` no model or dataset row holds (a file
    whose registration never inserted its row, or whose row was deleted before it)."""
    candidates = sorted({k for k in keys if k.split("/", 1)[0] in INPUT_FOLDERS})
    held: set[str] = set()
    for i in range(0, len(candidates), 500):
        chunk = candidates[i : i + 500]
        for table in (Model, Dataset):
            held.update(session.scalars(select(table.path).where(table.path.in_(chunk))))
    return set(candidates) - held


def delete(table: type[Input], *, session: Session, tenant: Tenant, id: str) -> Input:
    """Deletes the row and returns it (the caller removes the stored file). 409 while an active job uses it.

    The check and the delete are one writer's transaction: the row is locked first (PostgreSQL), or the database
    (SQLite, ``begin_write``), so a job inserted concurrently either commits before the check sees it or fails
    its foreign-key check (or ``jobs.create``'s second look) after the delete."""
    begin_write(session)
    row = find(table, session=session, tenant=tenant, id=id, lock=True)
    if row is None:
        session.rollback()
        raise _not_found(table, id)
    if session.scalar(select(exists().where(_USED_BY[table] == id, Job.state.in_(ACTIVE_STATES)))):
        session.rollback()
        raise Conflict(f"{table.__name__} {id!r} is used by a queued or running job")
    session.delete(row)
    session.commit()
    return row
