"""Failures that come from running a job rather than from its inputs; stored in ``Job.error`` as problems."""

from __future__ import annotations

from core.errors import ArboristError


class WorkerLost(ArboristError):
    """The job's worker stopped heartbeating (killed, crashed, lost its host) once too often."""

    type = "worker-lost"
    title = "The job's worker was lost"
    status = 503


class TimeLimitExceeded(ArboristError):
    type = "time-limit-exceeded"
    title = "Job time limit exceeded"
    status = 504


class InternalError(ArboristError):
    """An unexpected exception in the run: a bug, or an environment problem (disk full, CUDA error)."""

    type = "internal-error"
    title = "Internal error while running the job"
    status = 500
