"""The embedded worker: jobs without a broker. The database is the queue.

``python -m worker.embedded [--concurrency N]`` polls the ``jobs`` table (about once a second) for ``queued``
rows, and runs each job in its own child process (forked from a pre-loaded fork server, so torch is imported
once; the child claims the job in SQL exactly as a Celery task does, through ``worker.runner``). The same
process runs the reaper. ``arborist serve`` starts one of these next to the API.

Guarantees: a job is claimed by a compare-and-set in SQL, so several embedded workers (even a Celery worker)
may poll the same database. Ctrl-C / SIGTERM asks running jobs to stop at their next check: each goes back to
``queued`` (``released``) and resumes from its checkpoint on the next start. A job whose process died (killed,
crashed, or the machine rebooted) is requeued at once on the next poll or start on the same host (its pid is
gone), or by the reaper after ``heartbeat_timeout_s`` otherwise. Job processes die with the worker, and the worker
(``--parent-pid``) with ``arborist serve``, however it ends (``worker.lifeline``): a ``kill -9`` leaves no job
running for nobody, and a restart no second worker.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

import click

from core.service.db import attempts, scheduling
from core.service.limits import running_caps
from core.service.queue import QUEUES, EmbeddedQueue
from core.service.settings import Settings, get_settings
from worker.control import Control
from worker.db import Database
from worker.lifeline import die_with
from worker.reaper import Reaper, handle_lost, holder_dead_here, worker_name

log = logging.getLogger("arborist.embedded")

NODE = f"embedded@{socket.gethostname()}"
#: seconds a stopping worker gives its jobs to release themselves before they are killed
STOP_GRACE_S = 30.0


class JobTimeLimit(Exception):
    """Raised in a job process when ``Settings.job_time_limit_s`` has passed (SIGALRM)."""


def _job_process(job_id: str, payload: dict[str, Any], worker_pid: int) -> None:
    """The body of a job's child process; it dies with the worker that started it (``worker.lifeline``)."""
    from worker import runner

    die_with(worker_pid)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_payload(payload)
    control = Control()

    def interrupt(signum: int, _frame: Any) -> None:
        control.interrupt("the embedded worker is shutting down")

    def time_limit(signum: int, _frame: Any) -> None:
        raise JobTimeLimit()

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGALRM, time_limit)
    signal.setitimer(signal.ITIMER_REAL, settings.job_time_limit_s)
    runner.run_job(job_id, settings, worker=worker_name(NODE), control=control, time_limit_errors=(JobTimeLimit,))


def _context() -> Any:
    """A fork server with the run's modules pre-imported (no CUDA; ``worker.preload``: what a job imports on its way
    out), else plain spawn."""
    if sys.platform.startswith("linux"):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["worker.runner", "worker.preloaded"])
        return ctx
    return mp.get_context("spawn")


class EmbeddedWorker:
    def __init__(
        self, settings: Settings, *, concurrency: int = 1, poll_s: float = 1.0, queues: tuple[str, ...] = QUEUES
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be ≥ 1")
        self.settings, self.concurrency, self.poll_s, self.queues = settings, concurrency, poll_s, queues
        self.db = Database(settings.database_url)
        self.reaper = Reaper(settings, queue=EmbeddedQueue(), db=self.db)
        self.children: dict[str, BaseProcess] = {}
        self.stopping = threading.Event()
        self._ctx = _context()
        self._payload = settings.as_payload()
        default_cap, caps = running_caps(settings)
        self.caps: dict[str, Any] = {"default_cap": default_cap, "caps": caps}  # tenants' running_jobs limits

    def recover(self) -> None:
        """Requeues jobs held by processes of this node that no longer exist."""
        me = worker_name(NODE)
        held = self.db.call(
            lambda s: attempts.running_jobs(session=s, worker_prefix=f"{NODE}:"), deadline_s=10, what="recover"
        )
        for job in held:
            if holder_dead_here(job.worker, me):
                handle_lost(self.db, job, self.settings, reason="its embedded worker process exited")

    def _reap_children(self) -> bool:
        exited = False
        for job_id, proc in list(self.children.items()):
            if proc.exitcode is None:
                continue
            proc.join()
            del self.children[job_id]
            exited = True
            if proc.exitcode != 0:
                log.warning("job %s: process exited with code %s", job_id, proc.exitcode)
        return exited

    def _start(self, job_id: str) -> None:
        proc = self._ctx.Process(
            target=_job_process, args=(job_id, self._payload, os.getpid()), name=f"arborist-{job_id}"
        )
        proc.start()
        self.children[job_id] = proc
        log.info("job %s: started in process %s", job_id, proc.pid)

    def poll_once(self) -> None:
        if self._reap_children():
            self.recover()
        free = self.concurrency - len(self.children)
        if free <= 0 or self.stopping.is_set():
            return
        ids = self.db.call(
            lambda s: scheduling.fair_queued(
                session=s, queues=self.queues, exclude=list(self.children), limit=free, **self.caps
            ),
            deadline_s=10,
            what="poll",
        )
        for job_id in ids:
            self._start(job_id)

    def run(self) -> None:
        log.info(
            "embedded worker %s: concurrency %d, queues %s, database %s",
            NODE,
            self.concurrency,
            ",".join(self.queues),
            self.settings.database_url.split("@")[-1],
        )
        next_sweep = 0.0
        try:
            self.recover()
            while not self.stopping.is_set():
                try:
                    if time.monotonic() >= next_sweep:
                        self.reaper.safe_sweep()
                        next_sweep = time.monotonic() + self.settings.reaper_interval_s
                    self.poll_once()
                except Exception:
                    log.exception("embedded worker: poll failed")
                self.stopping.wait(self.poll_s)
        finally:
            self.shutdown()

    def shutdown(self, grace_s: float = STOP_GRACE_S) -> None:
        """Asks running jobs to release themselves (SIGTERM), then kills what is left after ``grace_s``."""
        for proc in self.children.values():
            if proc.exitcode is None and proc.pid:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for proc in self.children.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for job_id, proc in self.children.items():
            if proc.exitcode is None:
                log.warning(
                    "job %s: did not stop within %gs; killing it (it resumes on the next start)", job_id, grace_s
                )
                proc.kill()
                proc.join(5)
        self.children.clear()
        self.db.dispose()


@click.command("embedded-worker")
@click.option("--concurrency", "-c", default=1, show_default=True, help="jobs run at once")
@click.option("--poll-interval", default=1.0, show_default=True, help="seconds between polls of the jobs table")
@click.option("--log-level", default="INFO", show_default=True)
@click.option(
    "--parent-pid",
    type=int,
    default=None,
    help="die with this process, and take the running jobs along (`arborist serve` passes its own pid)",
)
def main(concurrency: int, poll_interval: float, log_level: str, parent_pid: int | None) -> None:
    """Run jobs from the database, without a broker (settings from ARBORIST_* variables)."""
    if parent_pid is not None:
        die_with(parent_pid)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = EmbeddedWorker(get_settings(), concurrency=concurrency, poll_s=poll_interval)

    def stop(signum: int, _frame: Any) -> None:
        log.info("embedded worker: signal %d, stopping", signum)
        worker.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.run()


if __name__ == "__main__":  # pragma: no cover
    main()
