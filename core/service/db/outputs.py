"""What a job leaves behind: its events (a per-job sequence), metric points and artifact rows.

``emit`` appends an event inside the caller's transaction (job state changes use it); the other writers commit.
The readers take a bare ``job_id``: the API checks the job's tenant first (``jobs.get``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core.errors import NotFound
from core.service.db.tables import Artifact, Job, JobEvent, JobMetric


def emit(session: Session, job_id: str, type: str, data: dict[str, Any] | None = None) -> JobEvent:
    """Appends an event in the caller's transaction; ``seq`` comes from an atomic per-job counter."""
    seq = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(event_seq=Job.event_seq + 1)
        .returning(Job.event_seq)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if seq is None:
        raise NotFound(f"Job {job_id!r} not found")
    event = JobEvent(job_id=job_id, seq=seq, type=type, data=data)
    session.add(event)
    return event


def add_event(*, session: Session, job_id: str, type: str, data: dict[str, Any] | None = None) -> JobEvent:
    event = emit(session, job_id, type, data)
    session.commit()
    return event


def list_events(*, session: Session, job_id: str, after_seq: int = 0, limit: int = 100) -> list[JobEvent]:
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
    return list(session.scalars(stmt.order_by(JobEvent.seq).limit(limit)))


def add_metric(
    *,
    session: Session,
    job_id: str,
    step: int,
    kind: str = "prune",
    epoch: float | None = None,
    sparsity: float | None = None,
    loss: float | None = None,
    metric: float | None = None,
    seconds: float | None = None,
) -> JobMetric:
    """Adds a curve point, replacing one of the same ``(step, kind)``: a resumed run recomputes the points it
    made after its last checkpoint (identically: runs are seeded), and the curve must not hold them twice."""
    session.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step == step, JobMetric.kind == kind))
    row = JobMetric(
        job_id=job_id, step=step, kind=kind, epoch=epoch, sparsity=sparsity, loss=loss, metric=metric, seconds=seconds
    )
    session.add(row)
    session.commit()
    return row


def list_metrics(*, session: Session, job_id: str) -> list[JobMetric]:
    return list(session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.id)))


def add_artifact(
    *,
    session: Session,
    job_id: str,
    name: str,
    path: str,
    size: int,
    sha256: str,
    kind: str = "model",
    media_type: str = "application/octet-stream",
) -> Artifact:
    """Records a stored file (``path`` is the artifact-store key). A retry replaces an artifact of the same name."""
    row = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if row is None:
        row = Artifact(job_id=job_id, name=name)
        session.add(row)
    row.kind, row.path, row.size, row.sha256, row.media_type = kind, path, size, sha256, media_type
    emit(session, job_id, "artifact", {"name": name, "kind": kind, "size": size, "sha256": sha256})
    session.commit()
    return row


def list_artifacts(*, session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(*, session: Session, job_id: str, name: str) -> Artifact:
    if "\x00" in name or len(name) > 255:
        raise NotFound(f"Artifact {name[:64]!r} not found")
    row = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if row is None:
        raise NotFound(f"Artifact {name!r} not found")
    return row
