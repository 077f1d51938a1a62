"""The Celery side: configuration, ``make_queue`` as the API uses it, messages on the right queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from redis import Redis

from _redis import flushed_db
from core.service.queue import EmbeddedQueue, make_queue
from core.service.queue.celery import BROKER_MARKER, DEFAULT_BROKER, TASK_NAME, CeleryQueue
from core.service.settings import Settings
from worker.celery_app import make_celery

REDIS_URL = os.environ.get("ARBORIST_TEST_QUEUE_REDIS_URL", "redis://127.0.0.1:6379/12")  # db 12: this module


def test_celery_configuration() -> None:
    app = make_celery(Settings(_env_file=None, broker_url="redis://example:6379/3", job_time_limit_s=7200))
    conf = app.conf
    assert conf.broker_url == "redis://example:6379/3"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_ignore_result
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_max_tasks_per_child == 1
    assert conf.broker_transport_options["visibility_timeout"] > 7200
    assert conf.task_soft_time_limit == 7200 < conf.task_time_limit
    assert {q.name for q in conf.task_queues} == {"cpu", "gpu"}
    assert app.amqp.router.route({"queue": "gpu"}, TASK_NAME, args=["j"], kwargs={})["queue"].name == "gpu"
    assert make_celery(Settings(_env_file=None)).conf.broker_url == DEFAULT_BROKER


def test_the_api_makes_its_queue_from_settings_alone() -> None:
    """What create_app does: no import of worker/, no torch, no CUDA in the API process."""
    code = (
        "import sys, json\n"
        "from core.service.settings import Settings\n"
        "from core.service.queue import make_queue\n"
        "celery = make_queue(Settings(_env_file=None, broker_url='redis://127.0.0.1:1/0'))\n"
        "embedded = make_queue(Settings(_env_file=None))\n"
        "print(json.dumps([type(celery).__name__, type(embedded).__name__,\n"
        "                  'torch' in sys.modules, any(m.split('.')[0] == 'worker' for m in sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == ["CeleryQueue", "EmbeddedQueue", False, False]


def test_the_worker_modules_do_not_touch_cuda() -> None:
    code = "import torch, worker.tasks, worker.embedded, worker.reaper; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_embedded_queue_sends_nothing() -> None:
    q = make_queue(Settings(_env_file=None))
    assert isinstance(q, EmbeddedQueue) and q.enqueue("job_x", queue="gpu") is None and q.ping()
    with pytest.raises(ValueError):
        q.enqueue("job_x", queue="tpu")


@pytest.fixture
def redis_db() -> Iterator[Redis]:
    with flushed_db(REDIS_URL) as client:
        yield client


def test_celery_queue_puts_the_message_on_the_named_queue(redis_db: Redis) -> None:
    queue = CeleryQueue.from_settings(Settings(_env_file=None, broker_url=REDIS_URL))
    assert queue.ping()
    task_id = queue.enqueue("job_abc", queue="gpu")
    assert task_id
    raw = redis_db.lpop("gpu")
    assert raw is not None and redis_db.llen("cpu") == 0
    message = json.loads(raw)
    assert message["headers"]["task"] == TASK_NAME and message["headers"]["id"] == task_id
    assert message["headers"]["argsrepr"] == "['job_abc']"
    with pytest.raises(ValueError):
        queue.enqueue("job_abc", queue="default")


def test_lost_messages_is_true_once_per_loss_of_redis_data(redis_db: Redis) -> None:
    queue = CeleryQueue.from_settings(Settings(_env_file=None, broker_url=REDIS_URL))
    assert queue.lost_messages() is True  # nothing marked yet: first sweep, or Redis lost its data
    assert queue.lost_messages() is False
    redis_db.delete(BROKER_MARKER)
    assert queue.lost_messages() is True
    memory = CeleryQueue.from_settings(Settings(_env_file=None, broker_url="memory://"))
    assert memory.lost_messages() is False


def test_a_turn_that_loses_its_claim_takes_the_next_queued_job(monkeypatch) -> None:
    """Turns T1 (message of A) and T2 (message of B) both pick A, the fairest; T2 claims it. T1 must not end as
    'skipped': its own job A is taken too, and B, whose message T2 spent on A, would wait for the reaper's resend."""
    from worker import runner, tasks

    queued = ["A", "B"]  # fairest first
    ran: list[str] = []

    def pick(own: str, settings) -> str:
        return queued[0] if queued else own

    def run(task, job_id: str, settings) -> runner.Outcome:
        if job_id == "A":  # T2 claimed A between T1's pick and T1's claim
            if "A" in queued:
                queued.remove("A")
            return runner.Outcome.SKIPPED
        if job_id in queued:
            queued.remove(job_id)
            ran.append(job_id)
            return runner.Outcome.SUCCEEDED
        return runner.Outcome.SKIPPED

    monkeypatch.setattr(tasks, "job_for_turn", pick)
    monkeypatch.setattr(tasks, "_run", run)
    monkeypatch.setattr(tasks, "settings_of", lambda app: None)
    assert tasks.run_job.run("A") == "succeeded"
    assert ran == ["B"] and queued == []
    # nothing else queued: the turn ends 'skipped' after trying its own job once
    assert tasks.run_job.run("A") == "skipped"
