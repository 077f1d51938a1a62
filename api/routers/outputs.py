"""Job outputs: metrics (JSON or CSV), events (Server-Sent Events), artifacts (list + checked download)."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session, sessionmaker

from api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep, close_session
from api.lifecycle import shutting_down
from api.routing import JSONBodyRoute
from api.schemas import METRIC_CSV_COLUMNS, ArtifactPublic, ArtifactsPublic, MetricPublic, MetricsPublic
from core.errors import NotFound, ServiceUnavailable
from core.service.artifacts import ARTIFACT_MEDIA_TYPES, DEFAULT_MEDIA_TYPE
from core.service.db import jobs, outputs
from core.service.db.base import is_transient_db_error
from core.service.db.tables import TERMINAL_STATES, JobEvent, JobState

router = APIRouter(prefix="/v1/jobs", tags=["job outputs"], route_class=JSONBodyRoute)

log = logging.getLogger("arborist.api")

EVENT_BATCH = 200
#: the largest event sequence number (``JobEvent.seq`` is a 32-bit integer on every database): a larger ``after``
#: or ``Last-Event-ID`` is a 422 before the stream starts, not a database error in the middle of it
MAX_EVENT_SEQ = 2**31 - 1
KEEPALIVE_S = 15.0


# --- metrics ------------------------------------------------------------------------------------------------


def _wants_csv(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "csv"
    accept = request.headers.get("accept", "").lower()
    return "text/csv" in accept and "application/json" not in accept


@router.get(
    "/{job_id}/metrics",
    response_model=MetricsPublic,
    responses={
        200: {
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "JSON, or CSV with `Accept: text/csv` or `?format=csv`",
        }
    },
)
def job_metrics(
    job_id: str,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    format: Annotated[Literal["json", "csv"] | None, Query(description="overrides the Accept header")] = None,
) -> Any:
    jobs.get(session=session, tenant=tenant, job_id=job_id)
    rows = [MetricPublic.model_validate(m) for m in outputs.list_metrics(session=session, job_id=job_id)]
    if not _wants_csv(request, format):
        return MetricsPublic(data=rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.model_dump(mode="json").items()})
    return Response(
        buf.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{job_id}-metrics.csv"'},
    )


# --- events (SSE) -------------------------------------------------------------------------------------------


def _sse(event: JobEvent) -> str:
    payload = {"seq": event.seq, "type": event.type, "data": event.data, "created_at": event.created_at.isoformat()}
    return f"id: {event.seq}\nevent: {event.type}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _poll(factory: sessionmaker[Session], job_id: str, after: int) -> tuple[JobState | None, list[JobEvent]]:
    """The job's state *then* the events after ``after``: if the state was terminal, no event can follow."""
    with factory() as session:
        try:
            state = jobs.get_unscoped(session=session, job_id=job_id).state
        except NotFound:
            return None, []
        return state, outputs.list_events(session=session, job_id=job_id, after_seq=after, limit=EVENT_BATCH)


async def _follow(request: Request, job_id: str, after: int, poll_s: float, max_s: float) -> AsyncIterator[str]:
    """The stream. It ends with ``event: end`` when the job is finished; without it (the client reconnects
    with ``Last-Event-ID`` and misses nothing) after ``max_s``, or when the server is shutting down (uvicorn
    would otherwise wait for every open stream before it stops). While the database is unreachable (a
    restart), or no slot of the gates is free (api.admission: a poll takes one of the few the streams may use, and
    one of the database's, for a moment; between polls a stream holds no slot, no connection and no thread), the
    stream stays open and polls again."""
    factory = request.app.state.sessionmaker
    stream_gate, db_gate = request.app.state.stream_gate, request.app.state.db_gate
    deadline = time.monotonic() + max_s
    last_sent = time.monotonic()
    yield f"retry: {int(max(poll_s, 1.0) * 1000)}\n\n"
    while True:
        if shutting_down(request.app):
            return
        try:
            async with stream_gate.hold(), db_gate.hold():
                state, events = await run_in_threadpool(_poll, factory, job_id, after)
        except Exception as exc:
            if isinstance(exc, ServiceUnavailable):
                log.debug("events of job %s: no database slot free; polling again", job_id)
            elif is_transient_db_error(exc):
                log.warning("events of job %s: database unreachable (%s); polling again", job_id, type(exc).__name__)
            else:
                raise
            if time.monotonic() >= deadline or await request.is_disconnected():
                return
            if time.monotonic() - last_sent >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            await anyio.sleep(max(poll_s, 1.0))
            continue
        for event in events:
            yield _sse(event)
            after = event.seq
            last_sent = time.monotonic()
        if len(events) == EVENT_BATCH:
            continue
        if state is None or state in TERMINAL_STATES:
            final = {"state": state.value if state else None}
            yield f"event: end\ndata: {json.dumps(final)}\n\n"
            return
        if time.monotonic() >= deadline or await request.is_disconnected():
            return
        if time.monotonic() - last_sent >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await anyio.sleep(poll_s)


def _json_data(schema: dict[str, Any]) -> dict[str, Any]:
    return {"properties": {"data": {"contentMediaType": "application/json", "contentSchema": schema}}}


#: one event of the stream (OpenAPI 3.2's ``itemSchema``: the fields of each event as an EventSource reads them);
#: its ``data`` is JSON: the stored event, or for the closing ``end`` the job's final state
EVENT_STREAM_ITEM: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "description": "the event's type (state, progress, checkpoint, ...); `end` last"},
        "id": {"type": "string", "pattern": r"^[0-9]{1,10}$", "description": "the event's sequence number"},
        "retry": {"type": "integer", "minimum": 0},
        "data": {"type": "string"},
    },
    "if": {"properties": {"event": {"const": "end"}}},
    "then": _json_data(
        {
            "type": "object",
            "required": ["state"],
            "properties": {"state": {"enum": [*(s.value for s in JobState), None]}},
        }
    ),
    "else": _json_data(
        {
            "type": "object",
            "required": ["seq", "type", "data", "created_at"],
            "properties": {
                "seq": {"type": "integer", "minimum": 1, "maximum": MAX_EVENT_SEQ},
                "type": {"type": "string"},
                "data": {"type": ["object", "null"]},
                "created_at": {"type": "string", "format": "date-time"},
            },
        }
    ),
}


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"itemSchema": EVENT_STREAM_ITEM}},
            "description": "stored events after Last-Event-ID / ?after=, then new ones until the job "
            "is finished (closing with `event: end`)",
        }
    },
)
async def job_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_SEQ, description="replay events with seq > after")] = None,
    last_event_id: Annotated[
        int | None,
        Header(
            ge=0,
            le=MAX_EVENT_SEQ,
            description="the `id` of the last event received (sent by an EventSource when it reconnects): replay "
            "events after it. Ids are event sequence numbers; anything else is refused (422), like an `after` out "
            "of range, before the stream starts",
        ),
    ] = None,
) -> StreamingResponse:
    def check() -> None:
        jobs.get(session=session, tenant=tenant, job_id=job_id)
        close_session(session)  # the stream polls with short sessions of its own: it holds no connection meanwhile

    await run_in_threadpool(check)
    start = max(after or 0, last_event_id or 0)
    return StreamingResponse(
        _follow(request, job_id, start, settings.sse_poll_interval_s, settings.sse_max_seconds),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# --- artifacts ----------------------------------------------------------------------------------------------


@router.get("/{job_id}/artifacts", response_model=ArtifactsPublic)
def list_artifacts(job_id: str, session: SessionDep, tenant: CurrentTenant) -> ArtifactsPublic:
    jobs.get(session=session, tenant=tenant, job_id=job_id)
    rows = outputs.list_artifacts(session=session, job_id=job_id)
    return ArtifactsPublic(
        data=[
            ArtifactPublic(
                name=a.name,
                kind=a.kind,
                size=a.size,
                sha256=a.sha256,
                media_type=a.media_type,
                created_at=a.created_at,
                url=f"/v1/jobs/{job_id}/artifacts/{quote(a.name)}",
            )
            for a in rows
        ]
    )


BINARY = {"type": "string", "format": "binary"}


def _etag_matches(if_none_match: str, etag: str) -> bool:
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {
                media: {"schema": {"type": "object"} if media == "application/json" else BINARY}
                for media in sorted({*ARTIFACT_MEDIA_TYPES.values(), DEFAULT_MEDIA_TYPE})
            },
            "description": "the file, as the media type of its name (ARTIFACT_MEDIA_TYPES: the report is JSON, "
            "curves CSV and PNG, weights octet-stream); ETag is its sha256",
            "headers": {
                "ETag": {"schema": {"type": "string"}},
                "X-Checksum-Sha256": {"schema": {"type": "string"}},
                "Digest": {"schema": {"type": "string"}},
            },
        },
        304: {"description": "If-None-Match matched"},
    },
)
def download_artifact(
    job_id: str,
    name: str,
    session: SessionDep,
    tenant: CurrentTenant,
    store: StoreDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    jobs.get(session=session, tenant=tenant, job_id=job_id)
    art = outputs.get_artifact(session=session, job_id=job_id, name=name)
    etag = f'"{art.sha256}"'
    b64 = base64.b64encode(bytes.fromhex(art.sha256)).decode()
    headers = {
        "ETag": etag,
        "X-Checksum-Sha256": art.sha256,
        "Digest": f"sha-256={b64}",
        "Repr-Digest": f"sha-256=:{b64}:",
        "Cache-Control": "private, max-age=0, must-revalidate",
    }
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    if not store.exists(art.path):
        raise NotFound(f"The data of artifact {name!r} is missing from the store")
    headers["Content-Length"] = str(art.size)
    headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(art.name)}"
    close_session(session)  # no database connection (nor gate slot) held while the file streams
    return StreamingResponse(store.iter_chunks(art.path), media_type=art.media_type, headers=headers)
