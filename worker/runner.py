"""One attempt at one job: claim it in SQL, load its inputs, run ``core.runs.run.execute``, store the outputs, and
map the outcome to the job's state. Used by the Celery task and by the embedded worker alike.

Outcomes (the return value of :func:`run_job`):

* ``succeeded``: artifacts uploaded to the store and recorded (sha256, size); the checkpoint is deleted.
* ``canceled``: the SQL cancel flag was seen (``RunHooks.cancelled``); the checkpoint is kept, so
  ``POST /v1/jobs/{id}/retry`` resumes from it.
* ``failed``: a domain error (``core.errors.ArboristError``: bad inputs, memory budget, …) becomes its
  RFC 9457 problem; the time limit becomes ``time-limit-exceeded``; a full disk (``ENOSPC``/``EDQUOT``, on the
  artifact store or the scratch directory) ``storage-full``, not retried: no partial output is left in the store,
  the last complete checkpoint is kept; anything else ``internal-error`` with the exception as the reason.
* ``released``: the worker is shutting down (embedded mode); the job goes back to ``queued`` and resumes later.
* ``skipped``: nothing to do (the job is not queued: a redelivered message, a canceled or finished job).
* ``lost``: another attempt owns the job now (this one was presumed dead by the reaper); nothing is written.

If the database stays unreachable past the retry deadline the exception propagates and the job stays
``running``: its heartbeat stops, and the reaper requeues it once the database is back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.service.artifacts import ArtifactStore, artifact_key
from core.runs.checkpoint import Checkpointer, DirectoryCheckpointer
from core.io.data import Dataset, check_compatible, load_dataset
from core.service.db import crud, worker_crud
from core.service.db.models import Job, JobState
from core.errors import ArboristError, Canceled, InvalidInput, StorageFull, no_space_error
from core.io.model_files import load_model
from core.errors import NotFound, problem_from_error
from core.runs.run import RunHooks, execute
from core.service.settings import Settings
from core.runs.spec import PruneSpec
from worker import reaper
from worker.db import Database, is_transient
from core.errors import InternalError, TimeLimitExceeded

log = logging.getLogger("arborist.worker")

MEDIA_TYPES = {
    ".safetensors": "application/octet-stream",
    ".onnx": "application/onnx",
    ".json": "application/json",
    ".csv": "text/csv",
    ".png": "image/png",
}
#: how long the final state write may keep retrying while the database is down
FINISH_DEADLINE_S = 300.0


def heartbeat_interval(settings: Settings) -> float:
    """A quarter of the timeout, between 0.2 s and 30 s: three missed beats are tolerated."""
    return min(max(settings.heartbeat_timeout_s / 4, 0.2), 30.0)


class Control:
    """Why the run should stop, shared by the hooks, the heartbeat thread and signal handlers."""

    def __init__(self) -> None:
        self.cancel = False
        self.lost = False
        self.interrupted: str | None = None

    def update(self, owned: bool, cancel: bool) -> None:
        if not owned:
            self.lost = True
        if cancel:
            self.cancel = True

    def interrupt(self, reason: str) -> None:
        self.interrupted = reason

    @property
    def stop(self) -> bool:
        return self.cancel or self.lost or self.interrupted is not None


class Heartbeat:
    """A daemon thread that refreshes ``heartbeat_at`` and picks up the cancel flag, while the job runs."""

    def __init__(self, db: Database, job_id: str, attempt: int, control: Control, interval: float):
        self.db, self.job_id, self.attempt, self.control, self.interval = db, job_id, attempt, control, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                owned, cancel = self.db.call(
                    lambda s: worker_crud.heartbeat(session=s, job_id=self.job_id, attempt=self.attempt),
                    deadline_s=max(self.interval, 1.0), what="heartbeat",
                )
            except Exception as exc:  # the next beat tries again; the reaper tolerates a few misses
                log.warning("heartbeat of job %s failed: %s", self.job_id, exc)
                continue
            self.control.update(owned, cancel)
            if not owned:
                log.warning("job %s: attempt %d no longer owns the job; stopping", self.job_id, self.attempt)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class DbHooks(RunHooks):
    """``RunHooks`` that write to SQL: throttled progress, every metric point and event, a cached cancel check."""

    def __init__(self, db: Database, job_id: str, attempt: int, control: Control, *,
                 min_interval: float = 0.5, event_interval: float = 5.0, poll_interval: float = 1.0):
        self.db, self.job_id, self.attempt, self.control = db, job_id, attempt, control
        self.min_interval, self.event_interval, self.poll_interval = min_interval, event_interval, poll_interval
        self._last_write = self._last_event = -math.inf
        self._last_poll = time.monotonic()
        self._last_message: str | None = None
        self._step: int | None = None
        self._sparsity: float | None = None

    def progress(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        final = fraction >= 1.0
        if not final and now - self._last_write < self.min_interval:
            return
        event = final or message != self._last_message or now - self._last_event >= self.event_interval
        step, sparsity = self._step, self._sparsity
        try:
            owned, cancel = self.db.call(
                lambda s: worker_crud.write_progress(session=s, job_id=self.job_id, attempt=self.attempt,
                                                     progress=fraction, step=step, sparsity=sparsity,
                                                     message=message, event=event),
                deadline_s=10.0, what="progress",
            )
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("job %s: progress not recorded (%s)", self.job_id, exc)  # the next one will be
            self._last_write = now
            return
        self._last_write = self._last_poll = now
        if event:
            self._last_event, self._last_message = now, message
        self.control.update(owned, cancel)

    def metric(self, point: dict) -> None:
        self._step, self._sparsity = int(point["step"]), point.get("sparsity")
        self.db.call(
            lambda s: worker_crud.record_metric(
                session=s, job_id=self.job_id, step=int(point["step"]), kind=str(point.get("kind", "prune")),
                epoch=point.get("epoch"), sparsity=point.get("sparsity"), loss=point.get("loss"),
                metric=point.get("metric"), seconds=point.get("seconds")),
            what="metric",
        )

    def event(self, kind: str, data: dict) -> None:
        payload = json.loads(json.dumps(data, default=str))
        self.db.call(lambda s: crud.add_event(session=s, job_id=self.job_id, type=kind, data=payload), what="event")

    def cancelled(self) -> bool:
        if self.control.stop:
            return True
        now = time.monotonic()
        if now - self._last_poll >= self.poll_interval:
            self._last_poll = now
            try:
                owned, cancel = self.db.call(
                    lambda s: worker_crud.job_control(session=s, job_id=self.job_id, attempt=self.attempt),
                    deadline_s=2.0, what="cancel check",
                )
                self.control.update(owned, cancel)
            except Exception as exc:
                if not is_transient(exc):
                    raise
        return self.control.stop


# --- checkpoints in the artifact store -------------------------------------------------------------------------


class StoreCheckpointer:
    """A ``DirectoryCheckpointer`` in a local scratch directory, mirrored to a remote artifact store after each
    save (tensors first, ``latest.json`` last: the commit point) and fetched from it on load."""

    def __init__(self, store: ArtifactStore, prefix: str, scratch: Path):
        self.store, self.prefix, self.scratch = store, prefix, Path(scratch)
        self.local = DirectoryCheckpointer(self.scratch)

    def save(self, tensors: dict, meta: dict) -> None:
        previous = self._remote_latest()
        self.local.save(tensors, meta)
        latest = json.loads((self.scratch / "latest.json").read_text())
        tensors_key = f"{self.prefix}/{latest['tensors']}"
        self.store.put_file(tensors_key, self.scratch / latest["tensors"])
        try:
            self.store.put_file(f"{self.prefix}/latest.json", self.scratch / "latest.json")
        except BaseException:
            if not previous or previous["tensors"] != latest["tensors"]:
                self.store.delete(tensors_key)  # not committed: no orphan beside the previous checkpoint
            raise
        if previous and previous["tensors"] != latest["tensors"]:
            self.store.delete(f"{self.prefix}/{previous['tensors']}")

    def _remote_latest(self) -> dict | None:
        key = f"{self.prefix}/latest.json"
        if not self.store.exists(key):
            return None
        with self.store.open(key) as fh:
            return json.loads(fh.read())

    def load(self) -> tuple[dict, dict] | None:
        latest = self._remote_latest()
        if latest is None:
            return None
        self.scratch.mkdir(parents=True, exist_ok=True)
        with self.store.open(f"{self.prefix}/{latest['tensors']}") as src, open(self.scratch / latest["tensors"],
                                                                                "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        (self.scratch / "latest.json").write_text(json.dumps(latest))
        return self.local.load()


def checkpoint_prefix(job_id: str) -> str:
    return f"checkpoints/{job_id}"


def checkpointer_for(store: ArtifactStore, job_id: str, scratch: Path) -> Checkpointer:
    """Checkpoints live in the artifact store under ``checkpoints/<job id>/``, so any worker can resume."""
    local = store.local_path(f"{checkpoint_prefix(job_id)}/latest.json")
    if local is not None:
        return DirectoryCheckpointer(local.parent)
    return StoreCheckpointer(store, checkpoint_prefix(job_id), scratch / "checkpoint")


def delete_checkpoint(store: ArtifactStore, job_id: str) -> None:
    local = store.local_path(f"{checkpoint_prefix(job_id)}/latest.json")
    if local is not None:
        shutil.rmtree(local.parent, ignore_errors=True)
        return
    try:
        store.fs.rm(store._path(checkpoint_prefix(job_id)), recursive=True)
    except FileNotFoundError:
        pass


# --- inputs and outputs ----------------------------------------------------------------------------------------


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
    model_row = db.call(lambda s: crud.get_model(session=s, tenant=None, model_id=job.model_id), what="load model row")
    ds_row = db.call(lambda s: crud.get_dataset(session=s, tenant=None, dataset_id=job.dataset_id),
                     what="load dataset row")
    try:
        with store.materialize(model_row.path) as path:
            model = load_model(path, model_row.format, arch=model_row.arch, arch_kwargs=model_row.arch_kwargs)
        if ds_row.path:
            with store.materialize(ds_row.path) as path:
                data = load_dataset(path, ds_row.format)
        else:
            data = load_dataset(ds_row.uri, ds_row.format, allowed_roots=settings.data_allowed_roots,
                                max_bytes=settings.max_upload_bytes)
    except FileNotFoundError as exc:
        raise NotFound(f"a stored input of the job is missing: {exc.filename or exc}") from None
    check_compatible(model, data, spec.loss.value)
    return spec, model, data


def summarize(report: dict, artifacts: dict[str, str]) -> dict[str, Any]:
    """What ``Job.result`` holds: the headline numbers (the full report is the ``report.json`` artifact)."""
    keys = ("method", "lambda", "sparsity", "parameters", "macs", "metrics", "seconds", "device", "onnx_error")
    return {**{k: report.get(k) for k in keys}, "artifacts": artifacts}


# --- the attempt -------------------------------------------------------------------------------------------------


class JobAttempt:
    def __init__(self, job_id: str, settings: Settings, *, worker: str, task_id: str | None = None,
                 time_limit_errors: tuple[type[BaseException], ...] = (), control: Control | None = None,
                 db: Database | None = None, store: ArtifactStore | None = None):
        self.job_id, self.settings, self.worker, self.task_id = job_id, settings, worker, task_id
        self.time_limit_errors = time_limit_errors
        self.control = control or Control()
        self.db = db or Database(settings.database_url)
        self.store = store or ArtifactStore(settings.artifact_root)
        self.attempt = 0

    # the SQL side
    def _claim(self) -> Job | None:
        claim = lambda s: crud.claim_job(session=s, job_id=self.job_id, task_id=self.task_id,  # noqa: E731
                                         worker=self.worker)
        job = self.db.call(claim, deadline_s=FINISH_DEADLINE_S, what="claim")
        if job is not None:
            return job
        try:
            current = self.db.call(lambda s: crud.get_job(session=s, tenant=None, job_id=self.job_id), what="read job")
        except NotFound:
            return None
        if current.state is JobState.RUNNING and reaper.holder_dead_here(current.worker, self.worker):
            # A redelivered message after our node's previous process died (OOM, segfault, pool restart):
            # no need to wait for the heartbeat timeout.
            outcome = reaper.handle_lost(self.db, current, self.settings, reason="its worker process died")
            if outcome == "requeued":
                return self.db.call(claim, deadline_s=FINISH_DEADLINE_S, what="claim")
        return None

    def _finish(self, state: JobState, **kw: Any) -> bool:
        return self.db.call(
            lambda s: worker_crud.finish_attempt(session=s, job_id=self.job_id, attempt=self.attempt, state=state,
                                                 **kw),
            deadline_s=FINISH_DEADLINE_S, what=f"finish ({state.value})",
        )

    def _fail(self, exc: ArboristError, **extra: Any) -> str:
        error = problem_from_error(exc, instance=f"/v1/jobs/{self.job_id}", **extra)
        return "failed" if self._finish(JobState.FAILED, error=error, message=exc.detail[:1000]) else "lost"

    def _upload(self, artifacts: dict[str, Path]) -> dict[str, str]:
        """Stores every output, then records them: all or nothing. If a file does not make it into the store
        (a full disk), the ones already stored are deleted and none is recorded, so a failed job shows no
        partial set of artifacts (each file is itself written under a temporary name and renamed)."""
        stored: list[tuple[str, Path, str, int, str]] = []
        try:
            for kind, path in artifacts.items():
                key = artifact_key(self.job_id, path.name)
                size, sha256 = self.store.put_file(key, path)
                stored.append((kind, path, key, size, sha256))
        except BaseException:
            for _, _, key, _, _ in stored:
                try:
                    self.store.delete(key)
                except Exception as exc:  # noqa: BLE001 — keep the original error
                    log.warning("job %s: could not delete partial output %s: %s", self.job_id, key, exc)
            raise
        names = {}
        for kind, path, key, size, sha256 in stored:
            media = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
            self.db.call(lambda s: crud.add_artifact(session=s, job_id=self.job_id, name=path.name, path=key,
                                                     size=size, sha256=sha256, kind=kind, media_type=media),
                         what="record artifact")
            names[kind] = path.name
        return names

    def run(self) -> str:
        job = self._claim()
        if job is None:
            log.info("job %s: not claimable (already taken, canceled or finished); skipping", self.job_id)
            return "skipped"
        self.attempt = job.attempts
        log.info("job %s: attempt %d started by %s", self.job_id, self.attempt, self.worker)
        scratch = Path(tempfile.mkdtemp(prefix=f"arborist-{self.job_id}-"))
        hooks = DbHooks(self.db, self.job_id, self.attempt, self.control)
        try:
            with Heartbeat(self.db, self.job_id, self.attempt, self.control, heartbeat_interval(self.settings)):
                outcome = self._execute(job, hooks, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("job %s: attempt %d %s", self.job_id, self.attempt, outcome)
        return outcome

    def _execute(self, job: Job, hooks: DbHooks, scratch: Path) -> str:
        try:
            spec, model, data = load_inputs(self.db, self.store, self.settings, job)
            if hooks.cancelled():
                raise Canceled("the run was canceled before it started")
            checkpointer = checkpointer_for(self.store, self.job_id, scratch)
            result = execute(spec, model, data, scratch / "out", hooks, checkpointer)
            if self.control.lost:
                return "lost"
            artifacts = self._upload(result.artifacts)
            if not self._finish(JobState.SUCCEEDED, result=summarize(result.report, artifacts), message="done"):
                return "lost"
            delete_checkpoint(self.store, self.job_id)
            return "succeeded"
        except Canceled:
            if self.control.lost:
                return "lost"
            if self.control.interrupted:
                reason = self.control.interrupted
                released = self.db.call(lambda s: worker_crud.release_attempt(
                    session=s, job_id=self.job_id, attempt=self.attempt, reason=reason),
                    deadline_s=30.0, what="release")
                return "released" if released else "lost"
            ok = self._finish(JobState.CANCELED,
                              message="canceled; the last checkpoint is kept (retry resumes from it)")
            return "canceled" if ok else "lost"
        except self.time_limit_errors:
            limit = self.settings.job_time_limit_s
            return self._fail(TimeLimitExceeded(
                f"the job ran past its time limit of {limit:g}s; the last checkpoint is kept (retry resumes)"))
        except ArboristError as exc:
            log.info("job %s failed: %s", self.job_id, exc.detail)
            return self._fail(exc)
        except Exception as exc:
            if is_transient(exc):
                log.error("job %s: database unreachable; leaving the job to the reaper: %s", self.job_id, exc)
                raise
            full = no_space_error(exc)
            if full is not None:
                # An environment problem, but not a transient one: retrying before space is freed would fail
                # the same way. The last complete checkpoint is kept, so a retry resumes from it.
                log.error("job %s: out of storage space: %s", self.job_id, full)
                return self._fail(StorageFull(
                    f"no space left on device ({type(full).__name__}: {full}); free space on the artifact store "
                    "or the worker's scratch disk, then retry the job: it resumes from its last checkpoint"))
            log.exception("job %s: unexpected error", self.job_id)
            detail = f"{type(exc).__name__}: {exc}".strip()[:2000]
            return self._fail(InternalError(detail))


def lower_cpu_priority(nice: int) -> None:
    """Raises every thread of this process to niceness ``nice`` (never lowers one: that takes privileges). On
    Linux niceness is per thread and inherited by new ones, so threads started later (torch's pool, the
    heartbeat) follow; those already running (a Celery pool child's own) are set one by one."""
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except (ProcessLookupError, PermissionError):  # a thread that just ended; a sandbox that forbids it
            pass


def run_job(job_id: str, settings: Settings, *, worker: str, task_id: str | None = None,
            time_limit_errors: tuple[type[BaseException], ...] = (), control: Control | None = None) -> str:
    """Runs (or resumes) ``job_id`` if it can be claimed, at niceness ``settings.job_nice``; returns the outcome
    (see the module docstring)."""
    lower_cpu_priority(settings.job_nice)
    attempt = JobAttempt(job_id, settings, worker=worker, task_id=task_id, time_limit_errors=time_limit_errors,
                         control=control)
    try:
        return attempt.run()
    finally:
        attempt.db.dispose()
