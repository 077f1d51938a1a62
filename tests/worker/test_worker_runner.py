"""``worker.runner`` without a broker: outcomes, problems, cancellation with resume, ownership, throttling."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import World
from core.errors import DoesNotFit
from core.service.artifacts import ArtifactStore
from core.service.checkpoints import StoreCheckpointer, checkpointer_for, delete_checkpoint
from core.service.db import attempts, jobs, outputs
from core.service.db.tables import JobState
from worker import runner
from worker.control import Control
from worker.db import Database
from worker.hooks import DbHooks
from worker.runner import run_job

PROBLEMS = "https://arborist.dev/problems/"


def test_success_records_artifacts_metrics_events_and_drops_the_checkpoint(world: World) -> None:
    job_id = world.job()
    assert run_job(job_id, world.settings, worker="test@host:1") == "succeeded"
    job = world.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.progress == 1.0 and job.attempts == 1 and job.error is None
    assert job.result["sparsity"]["target"] == 0.8 and job.result["artifacts"]["pruned"] == "pruned.safetensors"
    with world.sessions() as s:
        arts = {a.name: a for a in outputs.list_artifacts(session=s, job_id=job_id)}
        metrics = outputs.list_metrics(session=s, job_id=job_id)
    assert {"pruned.safetensors", "masks.safetensors", "report.json", "curve.csv", "curve.png"} <= set(arts)
    assert arts["quadratic.png"].media_type == "image/png"  # the quadratic-model check, a file of its own
    for art in arts.values():
        assert world.store.size(art.path) == art.size and world.store.sha256(art.path) == art.sha256
    assert arts["report.json"].media_type == "application/json"
    assert [m.kind for m in metrics] == ["dense", "prune", "epoch", "epoch"]
    kinds = [k for k, _ in world.events(job_id)]
    assert kinds[:2] == ["state", "state"] and kinds[-1] == "state"
    assert {"started", "pruned", "checkpoint", "progress", "artifact"} <= set(kinds)
    assert not world.store.exists(f"checkpoints/{job_id}/latest.json")
    # A redelivered message finds nothing to do.
    assert run_job(job_id, world.settings, worker="test@host:2") == "skipped"
    assert world.get(job_id).attempts == 1


def test_bad_input_fails_with_its_problem(world: World) -> None:
    job_id = world.job(arch_kwargs={"in_features": 64, "hidden": [16], "num_classes": 10})  # weights don't fit
    assert run_job(job_id, world.settings, worker="test@host:1") == "failed"
    job = world.get(job_id)
    assert job.state is JobState.FAILED
    assert job.error["type"] == PROBLEMS + "invalid-input" and job.error["status"] == 422
    assert job.error["instance"] == f"/v1/jobs/{job_id}" and "architecture" in job.error["detail"]


def test_domain_error_inside_the_run_keeps_its_type(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def too_big(*args: object, **kwargs: object) -> None:
        raise DoesNotFit("needs 9 GB, budget 1 GB")

    monkeypatch.setattr(runner, "execute", too_big)
    job_id = world.job()
    assert run_job(job_id, world.settings, worker="test@host:1") == "failed"
    assert world.get(job_id).error["type"] == PROBLEMS + "memory-budget-exceeded"


def test_unexpected_exception_fails_with_the_reason(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner, "execute", boom)
    job_id = world.job()
    assert run_job(job_id, world.settings, worker="test@host:1") == "failed"
    error = world.get(job_id).error
    assert error["type"] == PROBLEMS + "internal-error" and error["status"] == 500
    assert error["detail"] == "RuntimeError: CUDA error: an illegal memory access was encountered"


def test_time_limit_maps_to_its_problem(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    class SoftLimit(Exception):
        pass

    def slow(*args: object, **kwargs: object) -> None:
        raise SoftLimit()

    monkeypatch.setattr(runner, "execute", slow)
    job_id = world.job()
    outcome = run_job(job_id, world.settings, worker="test@host:1", time_limit_errors=(SoftLimit,))
    assert outcome == "failed" and world.get(job_id).error["type"] == PROBLEMS + "time-limit-exceeded"


def _run_in_thread(world: World, job_id: str, control: Control | None = None) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(
        target=lambda: out.append(run_job(job_id, world.settings, worker="test@host:1", control=control))
    )
    t.start()
    return t, out


def _wait_event(world: World, job_id: str, pred: Callable[[str, dict], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(pred(k, d) for k, d in world.events(job_id)):
            return
        time.sleep(0.05)
    raise AssertionError(f"event not seen: {world.events(job_id)[-5:]}")


LONG = {
    "sparsity": 0.8,
    "fisher": {"samples": 64, "lambda": 1e-3},
    "device": "cpu",
    "finetune": {"epochs": 16, "batch_size": 2},
}  # ~0.3 s per epoch on one thread


def test_cancel_keeps_the_checkpoint_and_retry_resumes(world: World) -> None:
    job_id = world.job(LONG)
    thread, out = _run_in_thread(world, job_id)
    _wait_event(world, job_id, lambda k, d: k == "checkpoint" and d["phase"] == "trained")
    with world.sessions() as s:
        jobs.cancel(session=s, tenant=world.tenant, job_id=job_id)
    thread.join(60)
    assert out == ["canceled"]
    job = world.get(job_id)
    assert job.state is JobState.CANCELED and job.error is None and "checkpoint" in job.message
    assert world.store.exists(f"checkpoints/{job_id}/latest.json")

    with world.sessions() as s:
        jobs.retry(session=s, tenant=world.tenant, job_id=job_id)
    assert run_job(job_id, world.settings, worker="test@host:2") == "succeeded"
    resumed = [d for k, d in world.events(job_id) if k == "resumed"]
    assert len(resumed) == 1 and world.get(job_id).attempts == 2
    with world.sessions() as s:
        keys = [(m.step, m.kind) for m in outputs.list_metrics(session=s, job_id=job_id)]
    assert len(keys) == len(set(keys)) == 18  # dense, prune, 16 epochs: none twice


def test_interrupt_releases_the_job(world: World) -> None:
    job_id = world.job(LONG)
    control = Control()
    thread, out = _run_in_thread(world, job_id, control)
    _wait_event(world, job_id, lambda k, d: k == "checkpoint")
    control.interrupt("shutting down")
    thread.join(60)
    assert out == ["released"]
    job = world.get(job_id)
    assert job.state is JobState.QUEUED and job.message == "shutting down" and job.worker is None


def test_an_attempt_that_lost_the_job_stops_and_writes_nothing(world: World) -> None:
    job_id = world.job(LONG)
    thread, out = _run_in_thread(world, job_id)
    _wait_event(world, job_id, lambda k, d: k == "checkpoint")
    with world.sessions() as s:  # the reaper presumed it dead, another worker claimed it
        assert attempts.requeue_lost(session=s, job_id=job_id, attempt=1, reason="test")
        assert attempts.claim(session=s, job_id=job_id, worker="other@host:9").attempts == 2
    thread.join(60)
    assert out == ["lost"]
    job = world.get(job_id)
    assert job.state is JobState.RUNNING and job.worker == "other@host:9" and job.attempts == 2


def test_progress_writes_are_throttled(world: World) -> None:
    job_id = world.job()
    with world.sessions() as s:
        attempts.claim(session=s, job_id=job_id, worker="t@h:1")
    db = Database(world.settings.database_url)
    hooks = DbHooks(db, job_id, 1, Control(), min_interval=0.2, event_interval=10)
    start = time.monotonic()
    calls = 0
    while time.monotonic() - start < 1.0:
        hooks.progress(0.5, "same message")
        calls += 1
        time.sleep(0.001)
    hooks.progress(1.0, "done")
    db.dispose()
    progress_events = [d for k, d in world.events(job_id) if k == "progress"]
    assert calls > 100
    assert len(progress_events) == 2  # first write, then only the final one (same message, < event interval)
    job = world.get(job_id)
    assert job.progress == 1.0 and job.message == "done"


def test_add_metric_replaces_a_recomputed_point(world: World) -> None:
    job_id = world.job()
    with world.sessions() as s:
        outputs.add_metric(session=s, job_id=job_id, step=3, kind="epoch", metric=0.5)
        outputs.add_metric(session=s, job_id=job_id, step=3, kind="epoch", metric=0.7)
        outputs.add_metric(session=s, job_id=job_id, step=3, kind="prune", metric=0.1)
        rows = [(m.step, m.kind, m.metric) for m in outputs.list_metrics(session=s, job_id=job_id)]
    assert rows == [(3, "epoch", 0.7), (3, "prune", 0.1)]


def test_checkpoints_in_a_remote_store_resume_on_another_worker(tmp_path: Path) -> None:
    store = ArtifactStore(f"memory://arb-checkpoints-{os.getpid()}-{time.monotonic_ns()}")
    first = checkpointer_for(store, "job_x", tmp_path / "a")
    assert isinstance(first, StoreCheckpointer) and first.load() is None
    first.save({"w": torch.ones(2)}, {"step": 1})
    first.save({"w": torch.zeros(2)}, {"step": 2})
    tensors, meta = checkpointer_for(store, "job_x", tmp_path / "b").load()  # another worker's scratch
    assert meta == {"step": 2} and torch.equal(tensors["w"], torch.zeros(2))
    assert not store.exists("checkpoints/job_x/state-1.safetensors")  # the previous generation is gone
    delete_checkpoint(store, "job_x")
    assert not store.exists("checkpoints/job_x/latest.json")
    assert not store.exists("checkpoints/job_x/state-2.safetensors")
    delete_checkpoint(store, "job_x")  # nothing left: fine


def test_lower_cpu_priority_reaches_every_thread_and_never_lowers() -> None:
    # In a child process: niceness cannot be lowered again, and this test process must keep its own. Relative to
    # the niceness this test runs at (inherited: CI may run under `nice`).
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base > 16:
        pytest.skip(f"running at niceness {base}: no room to raise it")
    code = f"""
import os, threading
from worker.runner import lower_cpu_priority
hold = threading.Event()
before = threading.Thread(target=hold.wait); before.start()      # running before the call
lower_cpu_priority({base + 3})
after = threading.Thread(target=hold.wait); after.start()        # started after it
lower_cpu_priority({base + 1})                                   # a lower value changes nothing
nice = [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")]
hold.set(); before.join(); after.join()
print(*nice)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    nice = out.stdout.split()
    assert set(nice) == {str(base + 3)} and len(nice) >= 3, out.stdout  # main, before, after (and the imports')


def test_known_torch_noise_is_not_emitted_by_a_job(world: World, recwarn: pytest.WarningsRecorder) -> None:
    """torch's pytree warns ``LeafSpec`` is deprecated (through copyreg, from the ONNX export) once per job process:
    52 lines in a serve log over 51 jobs. The job filters that one warning; others still come through."""
    job_id = world.job()
    assert run_job(job_id, world.settings, worker="test@host:1") == "succeeded"
    artifacts = world.get(job_id).result["artifacts"]
    assert any(name.endswith(".onnx") for name in artifacts.values()), artifacts  # the export that warns ran
    noise = [w for w in recwarn if "LeafSpec" in str(w.message)]
    assert not noise, [f"{w.filename}:{w.lineno}: {w.message}" for w in noise]
    import warnings

    with pytest.warns(FutureWarning, match="something else"):  # the filter is targeted, not a blanket ignore
        warnings.warn("something else", FutureWarning, stacklevel=1)
