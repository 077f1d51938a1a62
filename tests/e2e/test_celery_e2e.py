"""End to end on the production stack: uvicorn + celery worker processes, PostgreSQL, Redis.

1. The happy path: a key from ``arborist keys create``, a digits MLP and the digits data uploaded, a WoodFisher
   job at 80 % sparsity followed over SSE to success, the pruned safetensors downloaded and checked.
2. Crash-resume: the worker running a job is SIGKILLed (with its pool children) after a fine-tuning checkpoint;
   a second worker's reaper notices the missing heartbeat, requeues the job, and the job resumes from the
   checkpoint (a ``resumed`` event, ``attempts == 2``) and succeeds.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from _e2e_kit import (
    HEARTBEAT_TIMEOUT_S,
    Api,
    DigitsFiles,
    Proc,
    check_pruned_model,
    child_pids,
    happy_path,
    job_spec,
    sse_events,
    thread_nice,
)


def test_happy_path(api: Api, digits_files: DigitsFiles, start_worker: Callable[[str], Proc]) -> None:
    worker = start_worker("happy")
    happy_path(api, digits_files, timeout=150)
    worker.stop()


def test_worker_killed_mid_job_resumes_on_another_worker(
    api: Api, digits_files: DigitsFiles, start_worker: Callable[[str], Proc]
) -> None:
    first = start_worker("first")
    model_id, dataset_id = api.upload(digits_files)
    # Many small fine-tuning steps: long enough to be killed between two epoch checkpoints.
    job = api.submit(model_id, dataset_id, job_spec(epochs=25, batch_size=2))
    job_id = job["id"]

    checkpoint = None
    for kind, event in sse_events(api.client, job_id, timeout=120):
        if kind == "checkpoint" and event["data"]["phase"] == "trained" and event["data"]["epoch"] >= 1:
            checkpoint = event
            break
        assert kind != "end", f"job ended before a fine-tuning checkpoint: {event}\n{api.diagnostics()}"
    assert checkpoint is not None
    # The job runs in the pool child at the default niceness (Settings.job_nice), every thread of it (torch's
    # included); the worker's main process stays at the API's priority.
    assert first.popen is not None
    base = os.getpriority(os.PRIO_PROCESS, 0)  # inherited by the worker (CI may run under `nice`)
    assert thread_nice(first.popen.pid) == {base}
    assert [thread_nice(child) for child in child_pids(first.popen.pid)] == [{max(base, 10)}]

    first.kill_group(signal.SIGKILL)  # the main process and its pool child, like a lost container
    first.popen.wait(10)
    killed_at = time.monotonic()
    running = api.job(job_id)
    assert running["state"] == "running" and running["attempts"] == 1, running
    assert running["progress"] < 0.9, f"job nearly done before the kill; make it longer: {running}"

    start_worker("second")
    done = api.wait_state(job_id, {"succeeded", "failed", "canceled"}, timeout=180)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2, done
    assert time.monotonic() - killed_at >= HEARTBEAT_TIMEOUT_S - 1  # noticed through the heartbeat, not luck

    events = list(sse_events(api.client, job_id, timeout=30))
    requeued = [e for k, e in events if k == "state" and e["data"].get("requeued")]
    assert requeued and "no heartbeat" in requeued[0]["data"]["reason"], requeued
    resumed = [e for k, e in events if k == "resumed"]
    assert resumed, [k for k, _ in events]
    # It resumed from the checkpoint we saw (or a later one), not from scratch.
    assert resumed[0]["data"]["epoch"] >= checkpoint["data"]["epoch"], (resumed, checkpoint)
    attempts = [e["data"].get("attempt") for k, e in events if k == "state" and e["data"]["state"] == "running"]
    assert attempts == [1, 2], attempts

    metrics = api.client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    keys = [(m["step"], m["kind"]) for m in metrics]
    assert len(keys) == len(set(keys)) == 1 + 1 + 25, keys  # dense, prune, 25 epochs: none doubled by the resume
    check_pruned_model(api.download(job_id, "pruned.safetensors"), digits_files)
