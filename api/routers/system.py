"""Unauthenticated operational endpoints: liveness, readiness (database + queue), Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.auth import tenant_from_credentials
from api.deps import QueueDep, SessionDep
from api.observability import tenant_jobs_registry
from api.schemas import Health
from core.service.db import jobs

log = logging.getLogger("arborist.api")

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    # on the event loop: liveness must not wait for a thread, which a burst may have kept busy
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health, "description": "not ready"}})
def readyz(session: SessionDep, queue: QueueDep) -> Response:
    checks = {"database": False, "queue": False}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = True
    except Exception:
        log.warning("readiness: database check failed", exc_info=True)
    try:
        checks["queue"] = bool(queue.ping())
    except Exception:
        log.warning("readiness: queue ping failed", exc_info=True)
    ok = all(checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics", response_class=Response, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}
)
def metrics(request: Request, session: SessionDep) -> Response:
    """Request counts and latencies; with a tenant's API key (optional: a scraper needs none), also that tenant's
    jobs by state (no job counts without one: they would tell anyone how busy the other tenants are)."""
    body = generate_latest(request.app.state.metrics.registry)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=token.strip())
        tenant = tenant_from_credentials(session, credentials)
        body += generate_latest(tenant_jobs_registry(jobs.counts_by_state(session=session, tenant=tenant)))
    return Response(body, media_type=CONTENT_TYPE_LATEST)
