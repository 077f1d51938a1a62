"""The libraries a job imports on its way out (the ONNX export and its tidy-up, ONNX Runtime, the plots), imported
once in the process that job processes are forked from instead of by every job.

Every job runs in a fresh process (the embedded worker forks one per job from its fork server, Celery's prefork pool
one per task: ``worker_max_tasks_per_child=1``), so whatever that parent has not imported, each job imports again:
onnxscript, torch's ONNX exporter and matplotlib took 2.2 s of every job here (``python -X importtime``), a third of a
small model's whole job. The embedded worker preloads this module in its fork server; the Celery worker calls
:func:`preload` on ``worker_init``, in its main process before the pool forks. None of these touches CUDA.
"""

from __future__ import annotations

import importlib
import logging
import sys

log = logging.getLogger(__name__)

#: imported by every job that exports ONNX (core.io.onnx.export) or draws its plots (core.runs.report)
JOB_MODULES = (
    "torch.onnx._internal.exporter._core",
    "onnxscript",
    "onnxscript.optimizer",
    "onnxscript.rewriter",
    "onnxruntime",
    "matplotlib.pyplot",
)


def loaded() -> dict[str, bool]:
    """Which of :data:`JOB_MODULES` this process has imported (in a job process: what it started with)."""
    return {name: name in sys.modules for name in JOB_MODULES}


def preload() -> list[str]:
    """Imports :data:`JOB_MODULES` (matplotlib with the Agg backend, as the plots use it); returns the ones that
    failed to import (a job then imports them itself, or says why it cannot)."""
    import matplotlib

    matplotlib.use("Agg")
    failed = []
    for name in JOB_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 (an optional speed-up: the job itself reports a real failure)
            log.warning("preload: %s not imported: %s", name, e)
            failed.append(name)
    return failed
