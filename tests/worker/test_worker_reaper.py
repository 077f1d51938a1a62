"""The reaper's transitions (SQLite, a recording queue): requeue, give up, finish canceling, races, resends."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

from sqlalchemy import update

from conftest import World
from core.service.db import attempts, jobs
from core.service.db.base import utcnow
from core.service.db.tables import Job, JobState
from worker.reaper import Reaper, handle_lost, holder_dead_here, pid_alive, worker_name

PROBLEMS = "https://arborist.dev/problems/"


class RecordingQueue:
    resends_waiting = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.fail = False
        self.lost = False

    def enqueue(self, job_id: str, *, queue: str) -> str | None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((job_id, queue))
        return f"task-{len(self.sent)}"

    def revoke(self, task_id: str) -> None: ...

    def ping(self) -> bool:
        return True

    def lost_messages(self) -> bool:
        lost, self.lost = self.lost, False
        return lost


def _running(
    world: World, *, age_s: float, worker: str = "w@host:1", attempts_used: int | None = None, cancel: bool = False
) -> str:
    job_id = world.job()
    with world.sessions() as s:
        attempts.claim(session=s, job_id=job_id, worker=worker)
        values = {"heartbeat_at": utcnow() - timedelta(seconds=age_s)}
        if attempts_used is not None:
            values["attempts"] = attempts_used
        s.execute(update(Job).where(Job.id == job_id).values(**values))
        s.commit()
        if cancel:
            jobs.cancel(session=s, tenant=world.tenant, job_id=job_id)
    return job_id


def _reaper(world: World, queue: RecordingQueue | None = None) -> tuple[Reaper, RecordingQueue]:
    queue = queue or RecordingQueue()
    return Reaper(world.settings, queue=queue), queue


def test_stale_job_is_requeued_and_sent_again(world: World) -> None:
    stale = _running(world, age_s=60)
    fresh = _running(world, age_s=1)
    reaper, queue = _reaper(world)
    report = reaper.sweep()
    assert report.requeued == [stale] and queue.sent == [(stale, "cpu")]
    job = world.get(stale)
    assert job.state is JobState.QUEUED and job.worker is None and job.task_id == "task-1" and job.attempts == 1
    assert "no heartbeat for 30s from worker w@host:1" in job.message
    last = world.events(stale)[-1]
    assert last[0] == "state" and last[1]["requeued"] and last[1]["attempt"] == 1
    assert world.get(fresh).state is JobState.RUNNING
    # The next claim is attempt 2.
    with world.sessions() as s:
        assert attempts.claim(session=s, job_id=stale, worker="w@host:2").attempts == 2


def test_gives_up_after_max_attempts(world: World) -> None:
    job_id = _running(world, age_s=60, attempts_used=world.settings.max_attempts)
    reaper, queue = _reaper(world)
    assert reaper.sweep().failed == [job_id] and queue.sent == []
    job = world.get(job_id)
    assert job.state is JobState.FAILED and job.finished_at is not None
    assert job.error["type"] == PROBLEMS + "worker-lost" and job.error["attempts"] == 3
    assert "gave up after 3 attempt(s)" in job.error["detail"]


def test_a_canceling_job_whose_worker_died_ends_canceled(world: World) -> None:
    job_id = _running(world, age_s=60, cancel=True)
    reaper, queue = _reaper(world)
    assert reaper.sweep().canceled == [job_id] and queue.sent == []
    assert world.get(job_id).state is JobState.CANCELED


def test_a_late_heartbeat_wins_the_race(world: World) -> None:
    job_id = _running(world, age_s=60)
    stale_view = world.get(job_id)
    with world.sessions() as s:  # the worker was only slow
        assert attempts.heartbeat(session=s, job_id=job_id, attempt=1) == (True, False)
    from worker.db import Database

    db = Database(world.settings.database_url)
    try:
        assert handle_lost(db, stale_view, world.settings, reason="x", older_than=30) == "raced"
    finally:
        db.dispose()
    assert world.get(job_id).state is JobState.RUNNING


def test_failed_enqueues_are_retried_on_the_next_sweep(world: World) -> None:
    job_id = _running(world, age_s=60)
    reaper, queue = _reaper(world)
    queue.fail = True
    assert reaper.sweep().requeued == [job_id] and queue.sent == []
    queue.fail = False
    reaper.sweep()
    assert queue.sent == [(job_id, "cpu")]
    assert world.get(job_id).task_id == "task-1"


def test_queued_jobs_are_resent_when_the_broker_lost_its_messages(world: World) -> None:
    waiting = world.job()
    reaper, queue = _reaper(world)
    assert reaper.sweep().resent == [] and queue.sent == []  # a fresh job is not resent
    queue.lost = True
    assert reaper.sweep().resent == [waiting] and queue.sent == [(waiting, "cpu")]
    assert world.events(waiting)[-1] == ("resent", {"reason": "broker lost its messages"})


def test_no_resends_for_a_queue_without_messages(world: World) -> None:
    world.job()
    queue = RecordingQueue()
    queue.resends_waiting = False
    queue.lost = True
    reaper, _ = _reaper(world, queue)
    assert reaper.sweep().resent == [] and queue.sent == []


def test_holder_dead_here() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = worker_name("node@h")
    assert pid_alive(os.getpid()) and not pid_alive(dead.pid)
    assert holder_dead_here(f"node@h:{dead.pid}", me)
    assert not holder_dead_here(f"node@h:{os.getpid()}", me)  # alive
    assert not holder_dead_here(f"other@h:{dead.pid}", me)  # another node: only the heartbeat can tell
    assert not holder_dead_here(None, me) and not holder_dead_here("garbage", me)


def test_a_redelivered_task_takes_over_from_a_dead_process_of_its_node(world: World) -> None:
    from worker.runner import JobAttempt

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job_id = _running(world, age_s=0, worker=f"node@h:{dead.pid}")
    attempt = JobAttempt(job_id, world.settings, worker=worker_name("node@h"))
    try:
        job = attempt._claim()
    finally:
        attempt.db.dispose()
    assert job is not None and job.attempts == 2 and job.worker == worker_name("node@h")
    reasons = [d.get("reason") for k, d in world.events(job_id) if k == "state"]
    assert "its worker process died" in reasons
