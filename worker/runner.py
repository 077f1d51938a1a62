"""One attempt at one job: claim it in SQL, load its inputs, run ``core.runs.run.execute``, store the outputs, and
map the outcome to the job's state. Used by the Celery task and by the embedded worker alike.

Outcomes (``Outcome``, the return value of :func:`run_job`):

* ``succeeded``: artifacts uploaded to the store and recorded (sha256, size); the checkpoint is deleted.
* ``canceled``: the SQL cancel flag was seen (``RunHooks.cancelled``); the checkpoint is kept, so
  ``POST /v1/jobs/{id}/retry`` resumes from it.
* ``failed``: a domain error (``core.errors.ArboristError``: bad inputs, the memory budget (the lower of the
  spec's and the server's), weights or losses gone non-finite (``numerical-error``), …) becomes its RFC 9457
  problem; the time limit becomes ``time-limit-exceeded``; a full disk (``ENOSPC``/``EDQUOT``, on the artifact
  store or the scratch directory) ``storage-full``, not retried: no partial output is left in the store, the last
  complete checkpoint is kept; anything else ``internal-error`` with the exception as the reason.
* ``released``: the worker is shutting down (embedded mode); the job goes back to ``queued`` and resumes later.
* ``skipped``: nothing to do (the job is not queued: a redelivered message, a canceled or finished job).
* ``lost``: another attempt owns the job now (this one was presumed dead by the reaper); nothing is written.

If the database stays unreachable past the retry deadline the exception propagates and the job stays
``running``: its heartbeat stops, and the reaper requeues it once the database is back.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from enum import Enum
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.errors import (
    ArboristError,
    Canceled,
    InternalError,
    NotFound,
    StorageFull,
    TimeLimitExceeded,
    no_space_error,
    problem_from_error,
)
from core.runs.phases import PhaseTimer
from core.runs.run import execute
from core.runs.speed import LatencyConfig
from core.service.artifacts import ArtifactStore, artifact_key, artifact_media_type
from core.service.checkpoints import checkpointer_for, delete_checkpoint
from core.service.db import attempts, jobs, outputs
from core.service.db.base import is_transient_db_error
from core.service.db.tables import Job, JobState
from core.service.settings import Settings
from worker import reaper
from worker.control import Control, Heartbeat, heartbeat_interval
from worker.db import Database
from worker.hooks import DbHooks
from worker.inputs import load_inputs

log = logging.getLogger("arborist.worker")


class Outcome(str, Enum):
    """How an attempt ended (see the module docstring)."""

    SUCCEEDED = "succeeded"
    CANCELED = "canceled"
    FAILED = "failed"
    RELEASED = "released"
    SKIPPED = "skipped"
    LOST = "lost"


#: how long the final state write may keep retrying while the database is down
FINISH_DEADLINE_S = 300.0


def summarize(report: dict, artifacts: dict[str, str]) -> dict[str, Any]:
    """What ``Job.result`` holds: the headline numbers (the full report is the ``report.json`` artifact)."""
    keys = (
        "method",
        "lambda",
        "lambda_scale",
        "lambda_effective",
        "lambda_sweep",
        "recompute",
        "recompute_sweep",
        "sparsity",
        "parameters",
        "macs",
        "metrics",
        "seconds",
        "phases",
        "memory",
        "device",
    )
    keys += ("onnx_error", "structure")
    return {**{k: report.get(k) for k in keys}, "artifacts": artifacts}


class JobAttempt:
    def __init__(
        self,
        job_id: str,
        settings: Settings,
        *,
        worker: str,
        task_id: str | None = None,
        time_limit_errors: tuple[type[BaseException], ...] = (),
        control: Control | None = None,
        db: Database | None = None,
        store: ArtifactStore | None = None,
    ):
        self.job_id, self.settings, self.worker, self.task_id = job_id, settings, worker, task_id
        self.time_limit_errors = time_limit_errors
        self.control = control or Control()
        self.db = db or Database(settings.database_url)
        self.store = store or ArtifactStore(settings.artifact_root)
        self.attempt = 0

    # the SQL side
    def _claim(self) -> Job | None:
        def claim(s: Session) -> Job | None:
            return attempts.claim(session=s, job_id=self.job_id, task_id=self.task_id, worker=self.worker)

        job = self.db.call(claim, deadline_s=FINISH_DEADLINE_S, what="claim")
        if job is not None:
            return job
        try:
            current = self.db.call(lambda s: jobs.get_unscoped(session=s, job_id=self.job_id), what="read job")
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
            lambda s: attempts.finish(session=s, job_id=self.job_id, attempt=self.attempt, state=state, **kw),
            deadline_s=FINISH_DEADLINE_S,
            what=f"finish ({state.value})",
        )

    def _fail(self, exc: ArboristError, **extra: Any) -> Outcome:
        error = problem_from_error(exc, instance=f"/v1/jobs/{self.job_id}", **extra)
        return Outcome.FAILED if self._finish(JobState.FAILED, error=error, message=exc.detail[:1000]) else Outcome.LOST

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
                except Exception as exc:  # noqa: BLE001 (keep the original error)
                    log.warning("job %s: could not delete partial output %s: %s", self.job_id, key, exc)
            raise
        names = {}
        for kind, path, key, size, sha256 in stored:
            media = artifact_media_type(path.name)
            row = dict(job_id=self.job_id, name=path.name, path=key, size=size, sha256=sha256, kind=kind)
            row["media_type"] = media
            self.db.call(lambda s, row=row: outputs.add_artifact(session=s, **row), what="record artifact")
            names[kind] = path.name
        return names

    def run(self) -> Outcome:
        job = self._claim()
        if job is None:
            log.info("job %s: not claimable (already taken, canceled or finished); skipping", self.job_id)
            return Outcome.SKIPPED
        self.attempt = job.attempts
        log.info("job %s: attempt %d started by %s", self.job_id, self.attempt, self.worker)
        scratch = Path(tempfile.mkdtemp(prefix=f"arborist-{self.job_id}-"))
        hooks = DbHooks(self.db, self.job_id, self.attempt, self.control)
        try:
            with Heartbeat(self.db, self.job_id, self.attempt, self.control, heartbeat_interval(self.settings)):
                outcome = self._execute(job, hooks, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("job %s: attempt %d %s", self.job_id, self.attempt, outcome.value)
        return outcome

    def _execute(self, job: Job, hooks: DbHooks, scratch: Path) -> Outcome:
        try:
            phases = PhaseTimer()
            with phases("load"):
                spec, model, data = load_inputs(self.db, self.store, self.settings, job)
            if hooks.cancelled():
                raise Canceled("the run was canceled before it started")
            checkpointer = checkpointer_for(self.store, self.job_id, scratch)
            result = execute(
                spec,
                model,
                data,
                scratch / "out",
                hooks,
                checkpointer,
                memory_budget_mb=self.settings.memory_budget_mb,
                phases=phases,
                latency=LatencyConfig(self.settings.latency_budget_s, tuple(self.settings.latency_batch_sizes)),
            )
            if self.control.lost:
                return Outcome.LOST
            artifacts = self._upload(result.artifacts)
            if not self._finish(JobState.SUCCEEDED, result=summarize(result.report, artifacts), message="done"):
                return Outcome.LOST
            delete_checkpoint(self.store, self.job_id)
            return Outcome.SUCCEEDED
        except Canceled:
            if self.control.lost:
                return Outcome.LOST
            if self.control.interrupted:
                reason = self.control.interrupted
                released = self.db.call(
                    lambda s: attempts.release(session=s, job_id=self.job_id, attempt=self.attempt, reason=reason),
                    deadline_s=30.0,
                    what="release",
                )
                return Outcome.RELEASED if released else Outcome.LOST
            ok = self._finish(
                JobState.CANCELED, message="canceled; the last checkpoint is kept (retry resumes from it)"
            )
            return Outcome.CANCELED if ok else Outcome.LOST
        except self.time_limit_errors:
            limit = self.settings.job_time_limit_s
            return self._fail(
                TimeLimitExceeded(
                    f"the job ran past its time limit of {limit:g}s; the last checkpoint is kept (retry resumes)"
                )
            )
        except ArboristError as exc:
            log.info("job %s failed: %s", self.job_id, exc.detail)
            return self._fail(exc)
        except Exception as exc:
            if is_transient_db_error(exc):
                log.error("job %s: database unreachable; leaving the job to the reaper: %s", self.job_id, exc)
                raise
            full = no_space_error(exc)
            if full is not None:
                # An environment problem, but not a transient one: retrying before space is freed would fail
                # the same way. The last complete checkpoint is kept, so a retry resumes from it.
                log.error("job %s: out of storage space: %s", self.job_id, full)
                return self._fail(
                    StorageFull(
                        f"no space left on device ({type(full).__name__}: {full}); free space on the artifact store "
                        "or the worker's scratch disk, then retry the job: it resumes from its last checkpoint"
                    )
                )
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


# Warnings a job process knows to be noise, each matched by category and message (never a blanket ignore):
#   torch's pytree deprecates ``isinstance(treespec, LeafSpec)`` and its own ONNX export (torch.export) still does
#   that, through copyreg: one FutureWarning per job process, nothing the user can act on.
KNOWN_NOISE: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


def filter_known_noise() -> None:
    """Hides :data:`KNOWN_NOISE` in this process (idempotent: ``warnings`` drops a filter added twice)."""
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def run_job(
    job_id: str,
    settings: Settings,
    *,
    worker: str,
    task_id: str | None = None,
    time_limit_errors: tuple[type[BaseException], ...] = (),
    control: Control | None = None,
) -> Outcome:
    """Runs (or resumes) ``job_id`` if it can be claimed, at niceness ``settings.job_nice``; returns the outcome
    (see the module docstring)."""
    filter_known_noise()
    lower_cpu_priority(settings.job_nice)
    attempt = JobAttempt(
        job_id, settings, worker=worker, task_id=task_id, time_limit_errors=time_limit_errors, control=control
    )
    try:
        return attempt.run()
    finally:
        attempt.db.dispose()
