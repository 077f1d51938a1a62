"""The job libraries are imported once in the process jobs are forked from (``worker.preload``), not by each job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: run as the embedded worker's own process (a fork server is one per process: in this test process the API's
#: upload validation may have started it already, with its own preload)
_EMBEDDED = """
import json
from worker.embedded import _context
from worker.preload import loaded
ctx = _context()
assert ctx.get_start_method() == "forkserver", ctx.get_start_method()
with ctx.Pool(1) as pool:
    print(json.dumps({"job": pool.apply(loaded), "parent": loaded()}))
"""


def test_the_embedded_workers_job_processes_start_with_the_job_libraries_imported() -> None:
    if sys.platform != "linux":  # elsewhere the embedded worker spawns: nothing is preloaded
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _EMBEDDED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(seen["job"].values()), seen  # imported before the job's own code ran
    assert not any(seen["parent"].values()), seen  # the worker's main process itself did not import them


def test_the_celery_worker_preloads_them_before_its_pool_forks() -> None:
    from celery.signals import worker_init

    from worker import celery_app
    from worker.preload import loaded, preload

    receivers = [r[1]() if callable(r[1]) else r[1] for r in worker_init.receivers]
    assert celery_app._preload_job_modules in receivers
    assert preload() == [] and all(loaded().values())  # every one of them imports here
