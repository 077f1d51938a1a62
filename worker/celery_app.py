"""The Celery app, configured from ``Settings``.

Run a worker with ``celery -A worker.celery_app worker -Q cpu`` (or ``-Q gpu -c 1`` on a GPU host).

Job state lives in SQL; Celery only delivers "run job X" messages:

* no result backend (``task_ignore_result``); the job row is the source of truth;
* ``task_acks_late`` + ``task_reject_on_worker_lost`` + ``worker_prefetch_multiplier=1``: a message is acked
  only after its job ran, and a worker holds one message at a time;
* ``broker_transport_options.visibility_timeout`` longer than the longest job (``job_time_limit_s`` + 1 h), so
  Redis does not redeliver a message whose job is still running; a redelivered or duplicate message is harmless
  anyway, because the task only runs a job it can claim in SQL (``queued`` → ``running``);
* ``worker_max_tasks_per_child=1``: every job runs in a fresh child process, which returns all (GPU) memory;
* queues ``cpu`` and ``gpu``; the API picks one from the spec's device (``cuda`` → ``gpu``, else ``cpu``);
* the reaper (``worker.reaper``) runs on the main process's timer: dead workers' jobs are requeued.

CUDA is never touched before the fork: importing this module, ``worker.tasks`` or ``core`` makes no
``torch.cuda`` call; the run picks its device inside the child.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery, bootsteps
from celery.signals import worker_init, worker_ready

from core.service.queue.celery import CeleryQueue, messaging_config
from core.service.settings import Settings, get_settings

log = logging.getLogger("arborist.worker")

#: seconds between the soft time limit (the job fails cleanly) and the hard one (the child is killed)
HARD_LIMIT_GRACE_S = 120.0


def celery_config(settings: Settings) -> dict[str, Any]:
    """``messaging_config`` (what the senders use too) and the worker's own part: acks, prefetch, time limits."""
    limit = settings.job_time_limit_s
    return {
        **messaging_config(settings),
        "task_store_errors_even_if_ignored": False,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 1,
        "task_soft_time_limit": limit,
        "task_time_limit": limit + HARD_LIMIT_GRACE_S,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_redirect_stdouts": False,
    }


class ReaperStep(bootsteps.StartStopStep):
    """Runs ``Reaper.safe_sweep`` every ``reaper_interval_s`` on the worker's timer (main process, no thread)."""

    requires = frozenset({"celery.worker.components:Timer"})

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None
        self.reaper: Any = None

    def start(self, worker: Any) -> None:
        from worker.reaper import Reaper

        settings = settings_of(worker.app)
        self.reaper = Reaper(settings, queue=CeleryQueue(worker.app))
        self.tref = worker.timer.call_repeatedly(settings.reaper_interval_s, self.reaper.safe_sweep, priority=10)
        log.info(
            "reaper: every %gs (heartbeat timeout %gs, max attempts %d)",
            settings.reaper_interval_s,
            settings.heartbeat_timeout_s,
            settings.max_attempts,
        )

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.reaper is not None:
            self.reaper.close()
            self.reaper = None


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("arborist", include=["worker.tasks"], set_as_current=False)
    app.conf.update(celery_config(settings))
    app.arborist_settings = settings  # type: ignore[attr-defined]
    app.steps["worker"].add(ReaperStep)
    return app


def settings_of(app: Celery) -> Settings:
    return getattr(app, "arborist_settings", None) or get_settings()


@worker_init.connect
def _preload_job_modules(sender: Any = None, **_: Any) -> None:
    """In the main process, before the pool forks: the libraries every job would import again (``worker.preload``)."""
    from worker.preload import preload

    preload()


@worker_ready.connect
def _no_cuda_before_fork(sender: Any = None, **_: Any) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # is_initialized() itself does not initialize
        log.error("CUDA was initialized in the worker's main process: forked children cannot use the GPU")


def __getattr__(name: str) -> Any:
    """``worker.celery_app.app`` (what ``celery -A worker.celery_app`` loads) is built on first access from the
    environment's Settings, so importing this module has no effect."""
    if name in ("app", "celery"):
        app = make_celery()
        app.set_current()
        globals().update(app=app, celery=app)
        return app
    raise AttributeError(name)
