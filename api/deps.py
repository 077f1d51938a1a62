"""Dependencies as ``Annotated`` aliases. Everything comes from ``app.state`` (set by ``create_app``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from api.auth import bearer_scheme, tenant_from_credentials
from core.service.artifacts import ArtifactStore
from core.service.db.base import read_retrying
from core.service.db.tables import Tenant
from core.service.db.tenants import key_prefix
from core.service.queue import JobQueue
from core.service.settings import Settings

T = TypeVar("T")
#: the key of the request's gate slot in ``Session.info``
SLOT = "arborist.db_slot"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request, shared by its dependencies and endpoint (which run in the threadpool).

    First a slot of the database gate (``api.admission``): the request waits for it here, on the event loop, so
    that it takes a pooled connection only when one is there for it and never holds one while it waits for a
    thread (503 + Retry-After when none comes free in time). Creating a session does no I/O, so it happens here
    rather than costing a trip to the threadpool on every request; closing one that holds a connection does (a
    rollback, the return to the pool), so that goes to a thread, shielded from cancellation so the connection
    always goes back; then the slot."""
    slot = await request.app.state.db_gate.acquire()
    session = request.app.state.sessionmaker()
    session.info[SLOT] = slot
    try:
        yield session
    finally:
        try:
            if session.in_transaction():
                with anyio.CancelScope(shield=True):
                    await run_in_threadpool(session.close)
            else:
                session.close()
        finally:
            slot.release()


def close_session(session: Session) -> None:
    """Closes the request's session and gives its gate slot back, from the event loop or the threadpool: for
    endpoints that stream their response (events, downloads), so that the stream holds neither a pooled
    connection nor a slot while it lasts. The session must not be used afterwards."""
    session.close()
    _release_slot(session)


async def release_connection(session: Session) -> None:
    """Ends the session's transaction (so far, the authentication's read), returns its connection to the pool and
    its gate slot; the session stays usable and takes a connection again at its next statement (outside the gate,
    under the pool's timeout). For endpoints that then wait on something slow, an upload arriving, so that they do
    not hold a pooled connection, nor the slot of a request that could use it, meanwhile."""
    if session.in_transaction():
        await run_in_threadpool(session.commit)
    _release_slot(session)


def _release_slot(session: Session) -> None:
    slot = session.info.pop(SLOT, None)
    if slot is not None:
        slot.release()


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
# The session is closed after the response is sent (the rollback is then off the client's critical path). An
# endpoint that streams its response (events, artifact downloads) must close it itself before returning
# (``close_session``), or the stream holds a pooled connection and a gate slot for as long as it lasts.
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def get_current_tenant(request: Request, session: SessionDep, credentials: BearerCredentials) -> Tenant:
    tenant = tenant_from_credentials(session, credentials)
    check_rate(request, credentials, tenant.id, tenant.name)
    return tenant


def check_rate(
    request: Request, credentials: HTTPAuthorizationCredentials | None, tenant_id: str, tenant_name: str
) -> None:
    """The key's requests-per-second limit (``api.ratelimit``): 429 past it. Call after authentication."""
    limiter = request.app.state.rate_limiter
    if limiter.active and credentials is not None:
        limiter.check(key_prefix(credentials.credentials), tenant_id, tenant_name)


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


async def run_read(request: Request, read: Callable[[Connection], T]) -> T:
    """``read(connection)`` on a connection of the read engine (``core.service.db.base.read_retrying``: autocommit,
    no ping at checkout, run again once over a dropped connection), in one trip to the threadpool.

    For hot read paths (the status poll): there the dependency chain (``SessionDep`` + ``CurrentTenant`` + a sync
    endpoint = three trips to the threadpool, plus one to close the session, and a transaction around two reads)
    costs more than the queries do. ``read`` must authenticate itself (``tenants.authenticated_job``). The read
    gate (``api.admission``) bounds these reads to the read pool's size, and they run on threads of its own: a
    burst of other requests, which wait for the other gate and the shared threadpool, does not delay them."""
    gate = request.app.state.read_gate
    async with gate.hold():
        return await anyio.to_thread.run_sync(read_retrying, request.app.state.read_engine, read, limiter=gate.threads)
