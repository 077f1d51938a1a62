"""The routes models and datasets share: list, get and delete a tenant's own.

The two kinds of input are read, listed and deleted alike (``core.service.db.inputs`` takes the table), so
their routes are made here once rather than written twice. Route names (hence OpenAPI operation ids and
summaries), path parameters (``model_id``, ``dataset_id``) and responses are those of hand-written routes.
"""

# No ``from __future__ import annotations``: the endpoints below are annotated with a local (``InputId``), and
# FastAPI reads annotations as evaluated objects, not as names to look up in this module.

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Response, status

from api.deps import CurrentTenant, SessionDep, StoreDep
from api.routers._common import CursorQuery, LimitQuery
from api.schemas import Page, Public
from core.service.db import inputs
from core.service.db.tables import Dataset, Model


# The path parameter of each kind, as a dependency: the shared endpoints take the id from it, and the route keeps
# its own parameter name (``/{model_id}``) in the path and in the OpenAPI document.
def _model_id(model_id: str) -> str:
    return model_id


def _dataset_id(dataset_id: str) -> str:
    return dataset_id


#: each table's path parameter
_ID_PARAMS: dict[type, Callable[..., str]] = {Model: _model_id, Dataset: _dataset_id}


def add_input_routes(router: APIRouter, table: type[Model | Dataset], one: type[Public], many: type[Page]) -> None:
    """``GET ""``, ``GET /{<kind>_id}`` and ``DELETE /{<kind>_id}`` for ``table`` on ``router``: rows shown as
    ``one`` (a page as ``many``). A deleted row's stored file goes with it (a registered dataset's URI is the
    user's file: never deleted)."""
    kind = table.__name__.lower()
    InputId = Annotated[str, Depends(_ID_PARAMS[table])]

    # no docstrings: an endpoint's docstring would become its OpenAPI description
    def list_rows(
        session: SessionDep, tenant: CurrentTenant, limit: int = LimitQuery, cursor: str | None = CursorQuery
    ) -> Page:
        return many.of(inputs.list_page(table, session=session, tenant=tenant, limit=limit, cursor=cursor))

    def get_row(row_id: InputId, session: SessionDep, tenant: CurrentTenant) -> Public:
        return one.of(inputs.get(table, session=session, tenant=tenant, id=row_id))

    def delete_row(row_id: InputId, session: SessionDep, tenant: CurrentTenant, store: StoreDep) -> Response:
        row = inputs.delete(table, session=session, tenant=tenant, id=row_id)
        if row.path:
            store.delete(row.path)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    router.add_api_route("", list_rows, methods=["GET"], response_model=many, name=f"list_{kind}s")
    router.add_api_route(f"/{{{kind}_id}}", get_row, methods=["GET"], response_model=one, name=f"get_{kind}")
    router.add_api_route(
        f"/{{{kind}_id}}",
        delete_row,
        methods=["DELETE"],
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        name=f"delete_{kind}",
    )
