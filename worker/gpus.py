"""One Celery worker process per GPU, each pinned with ``CUDA_VISIBLE_DEVICES``.

    python -m worker.gpus --gpus all          # every GPU nvidia-smi lists
    python -m worker.gpus --gpus 0,2 -Q gpu   # GPUs 0 and 2, gpu queue only

Each child is ``celery -A worker.celery_app worker -c 1 -n gpu<i>@<host>`` with ``CUDA_VISIBLE_DEVICES=<i>``,
so inside it the job sees exactly one device as ``cuda:0``. This supervisor never imports torch: GPUs are
counted with ``nvidia-smi -L``, and CUDA is first touched inside a job's child process. A child that exits is
started again (after a pause); SIGTERM/SIGINT are passed on to every child (Celery's warm shutdown: running
jobs finish or, past the stop grace period, are requeued by the reaper).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import click

log = logging.getLogger("arborist.gpus")
RESTART_DELAY_S = float(os.environ.get("ARBORIST_GPU_RESTART_DELAY_S", "5"))


def visible_gpus(spec: str) -> list[str]:
    """``all`` → the indices ``nvidia-smi -L`` lists (none if it is missing); else a comma-separated list."""
    if spec != "all":
        ids = [s.strip() for s in spec.split(",") if s.strip()]
        if not ids:
            raise click.BadParameter("no GPU given", param_hint="--gpus")
        return ids
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(row for row in out.splitlines() if row.startswith("GPU "))]


def worker_command(gpu: str, queues: str, host: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        queues,
        "-c",
        "1",
        "-n",
        f"gpu{gpu}@{host}",
        "--without-gossip",
        "--without-mingle",
        *extra,
    ]


@dataclass
class Supervisor:
    gpus: list[str]
    queues: str
    host: str
    extra: tuple[str, ...] = ()
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    stopping: bool = False

    def start(self, gpu: str) -> None:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        self.children[gpu] = subprocess.Popen(worker_command(gpu, self.queues, self.host, self.extra), env=env)
        log.info("worker for GPU %s started (pid %d)", gpu, self.children[gpu].pid)

    def stop(self, signum: int, _frame: object = None) -> None:
        self.stopping = True
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signum)

    def run(self) -> int:
        for gpu in self.gpus:
            self.start(gpu)
        while not self.stopping:
            time.sleep(1.0)
            for gpu, child in list(self.children.items()):
                if child.poll() is not None and not self.stopping:
                    log.warning(
                        "worker for GPU %s exited with %s; restarting in %.0f s", gpu, child.returncode, RESTART_DELAY_S
                    )
                    time.sleep(RESTART_DELAY_S)
                    if not self.stopping:
                        self.start(gpu)
        codes = [child.wait() for child in self.children.values()]
        return max(codes, default=0)


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--gpus", default="all", show_default=True, help="'all' or comma-separated device indices")
@click.option("-Q", "--queues", default="gpu", show_default=True)
@click.option("--hostname", default=socket.gethostname, show_default="this host")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def main(gpus: str, queues: str, hostname: str, celery_args: tuple[str, ...]) -> None:
    """Start one pinned Celery worker per GPU and keep them running; extra arguments go to ``celery worker``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ids = visible_gpus(gpus)
    if not ids:
        raise click.ClickException("no GPU found (nvidia-smi -L listed none); run a cpu worker instead")
    sup = Supervisor(ids, queues, hostname, celery_args)
    signal.signal(signal.SIGTERM, sup.stop)
    signal.signal(signal.SIGINT, sup.stop)
    sys.exit(sup.run())


if __name__ == "__main__":
    main()
