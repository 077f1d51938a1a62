"""``arborist serve``: the whole service on one machine, with no external services.

What runs
    One command starts the API (uvicorn, in this process) and an embedded worker (a child process,
    ``python -m worker.embedded``, restarted if it dies). The database is SQLite (``./data/arborist.db``,
    migrated to head before anything starts), artifacts and checkpoints go to ``./data/artifacts``.

How jobs reach the worker: the database is the queue
    There is no broker. ``POST /v1/jobs`` inserts a ``queued`` row (the API's ``"embedded"`` queue sends
    nothing); the worker polls the jobs table about once a second, claims a job with the same compare-and-set
    a Celery task uses, and runs it in a fresh child process (forked from a server that pre-imported torch).
    Progress, metrics, events, cancellation and heartbeats all go through SQLite, which runs in WAL mode with a
    busy timeout, so the API, the poller and the job processes share it safely.

    We chose this over kombu's SQLAlchemy or filesystem transports: those add a second store of truth beside
    the jobs table, neither supports the acknowledgement semantics crash-resume needs, and a job still needs its
    row to be claimed. With the row as the message, nothing can be "queued in the broker but not in SQL".

Crash and restart
    Ctrl-C (or SIGTERM) asks running jobs to stop at their next check; they go back to ``queued`` and resume
    from their last checkpoint (after each pruning step and fine-tuning epoch) on the next ``arborist serve``.
    A job whose process was killed is requeued at once when the worker notices (same host, dead pid), and by
    the reaper after ``ARBORIST_HEARTBEAT_TIMEOUT_S`` otherwise. If this process is killed outright (``kill -9``,
    the OOM killer), the worker and its job processes die with it (``worker.lifeline``), so a restart never finds
    an old worker still running jobs; what the killed writes left in the artifact store is swept when the API
    starts (``api.housekeeping``, once older than ``ARBORIST_STAGING_GRACE_S``).

Limits
    * One machine: SQLite and a local artifact directory are not shared across hosts. For several workers,
      GPUs on other hosts, or high job rates, run the Celery deployment (``docker-compose.yml``: PostgreSQL,
      Redis, separate ``cpu``/``gpu`` workers).
    * SQLite has one writer at a time: fine for a handful of concurrent jobs (``--jobs``) and API clients,
      not for heavy multi-tenant load.
    * Polling adds up to ~1 s before a job starts; there are no priorities (oldest first) and no separate
      cpu/gpu queues (the one worker takes both; a ``cuda`` job needs a GPU on this machine).
    * The API is served by one uvicorn process; put a reverse proxy with TLS in front if it leaves localhost.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from cli.datadir import DEFAULT_DATA_DIR, data_dir_option
from cli.datadir import database_url as data_dir_database_url
from core.service.settings import Settings

log = logging.getLogger("arborist.serve")


def embedded_settings(data_dir: Path, database_url: str | None, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from the environment, with the embedded mode's database and queue; the artifact root is
    ``<data dir>/artifacts`` unless ``ARBORIST_ARTIFACT_ROOT`` (environment or ``.env``) sets one: an explicit
    setting wins (an ``s3://`` bucket, say)."""
    data_dir = data_dir.expanduser().resolve()
    values: dict[str, Any] = {
        "database_url": database_url or data_dir_database_url(data_dir),
        "broker_url": None,
        "queue_backend": "embedded",
        **(overrides or {}),
    }
    if "artifact_root" not in Settings().model_fields_set:
        values.setdefault("artifact_root", str(data_dir / "artifacts"))
    if "ARBORIST_DATA_ALLOWED_ROOTS" not in os.environ:
        values.setdefault("data_allowed_roots", [str(data_dir / "datasets")])
    return Settings(**values)


class WorkerSupervisor:
    """Keeps one ``python -m worker.embedded`` child running; restarts it (with backoff) if it exits.

    The worker dies with this process however it ends (``--parent-pid``: ``worker.lifeline``). On Linux the kernel
    kills it when the *thread* that started it ends, so one thread starts it, restarts it and stops it: the
    supervisor's own, which lives until the worker is gone.
    """

    def __init__(self, settings: Settings, concurrency: int, log_level: str):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ARBORIST_")}
        self.env.update(settings.to_env())
        self.cmd = [
            sys.executable,
            "-m",
            "worker.embedded",
            "--concurrency",
            str(concurrency),
            "--log-level",
            log_level,
            "--parent-pid",
            str(os.getpid()),
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.grace_s = 45.0
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait(30)

    def _spawn(self) -> None:
        # Its own session: a Ctrl-C in the terminal reaches only this process, which then stops the worker
        # (and must not mistake the worker's exit for a crash to restart).
        self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True)

    def _run(self) -> None:
        try:
            self._spawn()
        finally:
            self._started.set()
        backoff = 1.0
        while not self._stop.wait(1.0):
            assert self.proc is not None
            code = self.proc.poll()
            if code is None:
                backoff = 1.0
                continue
            log.error("embedded worker exited with code %s; restarting in %.0fs", code, backoff)
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, 60.0)
            self._spawn()
        self._terminate()

    def _terminate(self) -> None:
        """Asks the worker to release its running jobs and exit (SIGTERM); kills it after ``grace_s``."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            log.warning("the worker did not stop in time; killing it (its jobs resume on the next start)")
            self.kill()

    def kill(self) -> None:
        """Kills the worker and its job processes now (they resume from their checkpoints on the next start)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)

    def stop(self, grace_s: float = 45.0) -> None:
        """Stops the worker: its jobs are released (a second Ctrl-C meanwhile kills it instead)."""
        self.grace_s = grace_s
        self._stop.set()
        try:
            self._thread.join(grace_s + 15)
        except KeyboardInterrupt:
            log.warning("killing the worker (its jobs resume on the next start)")
        self.kill()


def _banner(url: str, settings: Settings, data_dir: Path) -> str:
    db = settings.database_url
    resolved = data_dir.expanduser().resolve()
    where = f"--data-dir {shlex.quote(str(resolved))}" if db == data_dir_database_url(resolved) else f"--url {db}"
    return (
        f"\nArborist is running at {url}  (API docs: {url}/docs, dashboard: {url}/ui/)\n"
        f"  database:  {db}\n"
        f"  artifacts: {settings.artifact_root}\n"
        f"  worker:    embedded (the database is the queue)\n"
        f"Create an API key (shown once) in another terminal:\n"
        f"  arborist keys create --tenant <your-name> {where}\n"
        f"then send it as 'Authorization: Bearer <key>'. Press Ctrl-C to stop.\n"
    )


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to bind")
@click.option("--port", default=8000, show_default=True, type=int)
@data_dir_option(DEFAULT_DATA_DIR, "holds arborist.db, artifacts/ and datasets/")
@click.option("--database-url", default=None, help="default: sqlite:///<data-dir>/arborist.db")
@click.option(
    "--jobs", "concurrency", default=1, show_default=True, type=click.IntRange(1, 64), help="jobs run at once"
)
@click.option("--no-worker", is_flag=True, help="serve the API only (jobs wait for a worker)")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
def serve(
    host: str, port: int, data_dir: Path, database_url: str | None, concurrency: int, no_worker: bool, log_level: str
) -> None:
    """Run the API and a worker on this machine: SQLite, local artifacts, no Redis."""
    import uvicorn

    from api.main import create_app
    from core.service.db import migrate

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = embedded_settings(data_dir, database_url)
    if "://" not in settings.artifact_root:
        Path(settings.artifact_root).expanduser().mkdir(parents=True, exist_ok=True)
    for root in settings.data_allowed_roots:
        if "://" not in root:
            Path(root).expanduser().mkdir(parents=True, exist_ok=True)
    click.echo(f"migrating {settings.database_url} ...", err=True)
    migrate.upgrade(settings.database_url)

    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    supervisor = None if no_worker else WorkerSupervisor(settings, concurrency, log_level.upper())

    def announce() -> None:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            click.echo(_banner(f"http://{shown}:{port}", settings, data_dir))

    if supervisor is not None:
        supervisor.start()
    threading.Thread(target=announce, name="announce", daemon=True).start()
    # uvicorn handles SIGINT/SIGTERM while it runs and re-raises them when it is done; these no-op handlers
    # receive that re-raise, so the worker is always stopped below (a second Ctrl-C then kills it).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if supervisor is not None:
            click.echo("stopping the worker (running jobs are released and resume on the next start) ...", err=True)
            supervisor.stop()


if __name__ == "__main__":  # pragma: no cover
    serve()
