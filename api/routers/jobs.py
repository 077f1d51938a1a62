"""/v1/jobs: create (idempotent), list, get, cancel, retry. The API validates and enqueues; workers run."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request, Response, status
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from api.auth import bearer_token
from api.deps import BearerCredentials, CurrentTenant, QueueDep, SessionDep, SettingsDep, check_rate, run_read
from api.routers._common import LOCATION, CursorQuery, LimitQuery
from api.routing import JSONBodyRoute
from api.schemas import JobCreate, JobPublic, JobsPublic
from core.engine.memory import MemoryPlan
from core.errors import ClientClosedRequest, DoesNotFit, InvalidInput, ServiceUnavailable, problem_from_error
from core.runs.hf_job import check_pairing
from core.runs.preflight import check_job
from core.runs.spec import PruneSpec
from core.service.db import jobs, tenants, usage
from core.service.db.tables import Dataset, Job, JobState, Model, Tenant
from core.service.limits import TenantLimits, limits_for
from core.service.queue import JobQueue

log = logging.getLogger("arborist.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=JSONBodyRoute)

RETRY_AFTER_S = {JobState.QUEUED: 2, JobState.RUNNING: 2, JobState.CANCELING: 1}
RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before polling again (while active)", "schema": {"type": "integer"}}
}


def queue_for(spec_device: str) -> str:
    return "gpu" if spec_device == "cuda" else "cpu"


def request_hash(body: JobCreate, spec: dict) -> str:
    fields = {"model_id": body.model_id, "dataset_id": body.dataset_id, "spec": spec}
    if body.priority:  # (left out at 0: the hashes of requests from before priorities are unchanged)
        fields["priority"] = body.priority
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def enqueue(session: Session, queue: JobQueue, job: Job) -> Job:
    """Hands a queued job to the queue; if the queue refuses, the job fails (retryable) and the caller gets 503."""
    try:
        task_id = queue.enqueue(job.id, queue=job.queue)
    except Exception as exc:
        log.exception("enqueue of job %s failed", job.id)
        err = ServiceUnavailable("The job queue is unavailable; retry the job later (POST .../retry)")
        jobs.finish(
            session=session,
            job_id=job.id,
            state=JobState.FAILED,
            error=problem_from_error(err, instance=f"/v1/jobs/{job.id}"),
        )
        raise err from exc
    jobs.set_task_id(session=session, job_id=job.id, task_id=task_id)
    return jobs.get_unscoped(session=session, job_id=job.id)


def check_budget_cap(spec: PruneSpec, cap: float | None) -> None:
    """422 when the spec asks for more memory than the server's ``ARBORIST_MEMORY_BUDGET_MB``."""
    if cap is not None and spec.memory_budget_mb is not None and spec.memory_budget_mb > cap:
        raise InvalidInput(
            f"spec.memory_budget_mb exceeds the server limit of {cap} MB",
            errors=[{"loc": ["body", "spec", "memory_budget_mb"], "msg": f"at most {cap}", "type": "less_than_equal"}],
        )


def preflight(spec: PruneSpec, server_budget_mb: float | None) -> Callable[[Model, Dataset], MemoryPlan | None]:
    """Checks a new job's spec against what is stored about its model and dataset (core.runs.preflight: no weights
    loaded, no data read), so that a job the run would refuse is a 422 now rather than a failed job later; the
    memory plan against the lower of the spec's and the server's budget among them."""

    def check(model: Model, dataset: Dataset) -> MemoryPlan | None:
        try:
            check_pairing(model.format, dataset.format)
            return check_job(
                spec,
                arch=model.arch if model.format == "safetensors" else None,
                arch_kwargs=model.arch_kwargs,
                num_examples=dataset.num_examples,
                input_shape=dataset.input_shape,
                num_classes=dataset.num_classes,
                has_val=dataset.has_val,
                server_budget_mb=server_budget_mb,
                model_format=model.format,
            )
        except (InvalidInput, DoesNotFit) as exc:
            raise type(exc)(exc.detail, errors=[{**e, "loc": ["body", *e["loc"]]} for e in exc.errors]) from None

    return check


def admission(tenant: Tenant, limits: TenantLimits) -> Callable[[Session], None] | None:
    """The tenant's queued-jobs check, run by ``jobs.create`` as a writer under the tenant's lock (none without
    a limit)."""
    if limits.queued_jobs is None:
        return None

    def admit(session: Session) -> None:
        usage.lock_tenant(session, tenant)
        usage.admit_job(session=session, tenant=tenant, limits=limits)

    return admit


def _positioned(job: JobPublic, conn: Connection | Session) -> JobPublic:
    """``job`` with its ``queue_position`` while it is queued."""
    if job.state is not JobState.QUEUED:
        return job
    position = jobs.queue_position(conn=conn, job_id=job.id, queue=job.queue, created_at=job.created_at)
    return job.model_copy(update={"queue_position": position})


def _public(job: Job, response: Response, session: Session) -> JobPublic:
    if job.state in RETRY_AFTER_S:
        response.headers["Retry-After"] = str(RETRY_AFTER_S[job.state])
    return _positioned(JobPublic.model_validate(job), session)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={
        202: {"description": "Job accepted and queued", "headers": LOCATION},
        200: {
            "description": "Replay of an earlier request with the same Idempotency-Key",
            "model": JobPublic,
            "headers": LOCATION,
        },
    },
)
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    queue: QueueDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(min_length=1, max_length=255, description="same key + same body returns the same job"),
    ] = None,
) -> JobPublic:
    spec = body.spec
    cap = settings.memory_budget_mb
    check_budget_cap(spec, cap)
    spec_json = spec.model_dump(mode="json", by_alias=True)
    if anyio.from_thread.run(request.is_disconnected):  # its client gave up waiting (a burst): create nothing
        raise ClientClosedRequest("The client closed the connection before the job was created")
    job, created = jobs.create(
        session=session,
        tenant=tenant,
        model_id=body.model_id,
        dataset_id=body.dataset_id,
        spec=spec_json,
        queue=queue_for(spec.device),
        idempotency_key=idempotency_key,
        request_hash=request_hash(body, spec_json),
        check=preflight(spec, cap),
        priority=body.priority,
        admit=admission(tenant, limits_for(settings, tenant.name)),
    )
    if created:
        job = enqueue(session, queue, job)
    else:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return _public(job, response, session)


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    tenant: CurrentTenant,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: int = LimitQuery,
    cursor: str | None = CursorQuery,
) -> JobsPublic:
    page = jobs.list_page(session=session, tenant=tenant, state=state, limit=limit, cursor=cursor)
    return JobsPublic(
        data=[_positioned(JobPublic.model_validate(j), session) for j in page.items],
        count=page.count,
        next_cursor=page.next_cursor,
    )


@router.get("/{job_id}", response_model=JobPublic, responses={200: {"headers": RETRY_AFTER}})
async def get_job(job_id: str, request: Request, credentials: BearerCredentials) -> Response:
    # The status poll, the API's hottest path: the key and the job in one query, in one trip to the threadpool,
    # and the body serialized once (returning a Response skips FastAPI's second validation of the model).
    token = bearer_token(credentials)
    tenants.key_prefix(token)  # a malformed key is a 401 before any database I/O, as on every other route

    limiter = request.app.state.rate_limiter

    def read(conn: Connection) -> Response:
        def rate(tenant_id: str) -> None:  # the key's rate limit, before the job is looked at
            name = limiter.known_name(tenant_id) or tenants.tenant_name(conn=conn, tenant_id=tenant_id)
            check_rate(request, credentials, tenant_id, name)

        row = tenants.authenticated_job(conn=conn, token=token, job_id=job_id, on_key=rate if limiter.active else None)
        job = _positioned(JobPublic.model_validate(row), conn)
        headers = {"Retry-After": str(RETRY_AFTER_S[job.state])} if job.state in RETRY_AFTER_S else None
        return Response(job.model_dump_json(), media_type="application/json", headers=headers)

    return await run_read(request, read)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(
    job_id: str, response: Response, session: SessionDep, tenant: CurrentTenant, queue: QueueDep
) -> JobPublic:
    """Queued jobs are canceled at once; running ones move to ``canceling`` until the worker stops."""
    job = jobs.cancel(session=session, tenant=tenant, job_id=job_id)
    if job.task_id:
        try:
            queue.revoke(job.task_id)
        except Exception:
            log.warning("revoke of task %s (job %s) failed", job.task_id, job.id, exc_info=True)
    return _public(job, response, session)


@router.post(
    "/{job_id}/retry",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={202: {"headers": LOCATION}},
)
def retry_job(
    job_id: str, response: Response, session: SessionDep, tenant: CurrentTenant, queue: QueueDep, settings: SettingsDep
) -> JobPublic:
    """Failed or canceled → queued again; the worker resumes from its last checkpoint. A job queued again counts
    against the tenant's queued-jobs limit like a new one (429 at it)."""
    admit = admission(tenant, limits_for(settings, tenant.name))
    if admit is not None:
        jobs.get(session=session, tenant=tenant, job_id=job_id)  # 404 before 429
        try:
            admit(session)  # under the tenant's lock until the retry commits
        except BaseException:
            session.rollback()
            raise
    job = jobs.retry(session=session, tenant=tenant, job_id=job_id)
    job = enqueue(session, queue, job)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return _public(job, response, session)
