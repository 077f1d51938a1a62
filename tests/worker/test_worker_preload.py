"""The job libraries are imported once in the process jobs are forked from (``worker.preload``), not by each job."""

from __future__ import annotations

import sys


def _imported(queue, names) -> None:  # runs in the job process, before it imports anything itself
    queue.put({name: name in sys.modules for name in names})


def test_the_embedded_workers_job_processes_start_with_the_job_libraries_imported() -> None:
    from worker.embedded import _context
    from worker.preload import JOB_MODULES

    ctx = _context()
    if ctx.get_start_method() != "forkserver":  # not Linux: plain spawn, nothing preloaded
        return
    queue = ctx.Queue()
    child = ctx.Process(target=_imported, args=(queue, JOB_MODULES))
    child.start()
    seen = queue.get(timeout=120)
    child.join(timeout=30)
    assert seen == dict.fromkeys(JOB_MODULES, True), seen
    assert "torch" in sys.modules  # (the parent, for contrast, imports what it needs on its own)


def test_the_celery_worker_preloads_them_before_its_pool_forks() -> None:
    from celery.signals import worker_init

    from worker import celery_app
    from worker.preload import preload

    receivers = [r[1]() if callable(r[1]) else r[1] for r in worker_init.receivers]
    assert celery_app._preload_job_modules in receivers
    assert preload() == []  # every one of them imports here
