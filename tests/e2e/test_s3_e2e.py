"""Beyond one machine (issue #19), end to end: the artifact store is a bucket on a real S3 protocol server (moto's),
and the Celery workers are separate processes in separate working directories with separate temporary
directories: they share nothing but PostgreSQL, Redis and S3, as workers on separate hosts would.

1. The happy path with the artifact root on S3: uploads, the job's checkpoints and outputs go to the bucket (none to
   a local disk), downloads stream back from it, and the checkpoint is deleted when the job succeeds.
2. A job starts on worker A, A is SIGKILLed after a fine-tuning checkpoint (which is in S3), the reaper of worker B
   requeues it and B resumes it from that checkpoint: it succeeds with exactly the weights of an uninterrupted run
   of the same spec.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load

from _e2e_kit import (
    HEARTBEAT_TIMEOUT_S,
    REAPER_INTERVAL_S,
    Api,
    ApiServer,
    DigitsFiles,
    Proc,
    base_env,
    create_key,
    happy_path,
    job_spec,
    sse_events,
    start_celery_worker,
)
from _pg import migrated_schema
from _redis import flushed_db
from _s3 import S3Server, moto_s3

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_URL = os.environ.get("ARBORIST_TEST_S3_REDIS_URL", "redis://127.0.0.1:6379/7")  # db 7: this module only
BUCKET = "arborist-hosts"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with moto_s3(BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def s3_pg_url() -> Iterator[str]:
    with migrated_schema("arb_s3e2e") as url:
        yield url


@pytest.fixture(scope="module")
def s3_env(s3: S3Server, s3_pg_url: str) -> Iterator[dict[str, str]]:
    with flushed_db(REDIS_URL):
        yield {
            **base_env(
                environment="dev",
                database_url=s3_pg_url,
                broker_url=REDIS_URL,
                artifact_root=f"s3://{BUCKET}/artifacts",
                data_allowed_roots=[f"s3://{BUCKET}/datasets"],
                heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
                reaper_interval_s=REAPER_INTERVAL_S,
                max_attempts=3,
                sse_poll_interval_s=0.2,
                sse_max_seconds=300,
            ),
            **s3.env,
        }


@pytest.fixture(scope="module")
def host_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hosts")


@pytest.fixture(scope="module")
def module_processes() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in reversed(procs):
            p.stop(grace=5)


@pytest.fixture(scope="module")
def s3_api(s3_env: dict[str, str], s3_pg_url: str, host_dirs: Path, module_processes: list[Proc]) -> Iterator[Api]:
    server = ApiServer(s3_env, host_dirs, module_processes, name="s3-api", log_level="warning").start()
    key = create_key(s3_pg_url, f"hosts-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        yield Api(client, lambda: "\n".join(p.describe() for p in module_processes))


@pytest.fixture(scope="module")
def start_host(s3_env: dict[str, str], host_dirs: Path, module_processes: list[Proc]) -> Callable[[str], Proc]:
    """A Celery worker as if on its own host: its own working directory and temporary directory (where its
    scratch goes), nothing in common with the API or another worker but PostgreSQL, Redis and S3."""

    def start(name: str) -> Proc:
        home = host_dirs / name
        (home / "tmp").mkdir(parents=True)
        env = {**s3_env, "TMPDIR": str(home / "tmp"), "HOME": str(home)}
        return start_celery_worker(name, env, host_dirs, module_processes, cwd=home)

    return start


#: what libraries leave in $TMPDIR by being imported, not by a job: onnxruntime writes a 51-byte `.ses` id file
LIBRARY_FILES = {".ses"}


def _local_files(directory: Path) -> list[Path]:
    """The files under a worker's home, but for library caches (matplotlib's font list) and library id files."""
    return [
        p
        for p in directory.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(directory).parts and p.name not in LIBRARY_FILES
    ]


def test_happy_path_with_the_artifact_root_on_s3(
    s3: S3Server, s3_api: Api, digits_files: DigitsFiles, start_host: Callable[[str], Proc], host_dirs: Path
) -> None:
    worker = start_host("solo")
    done = happy_path(s3_api, digits_files, timeout=180)  # downloads sha256-checked, streamed from the bucket
    job_id = done["id"]
    stored = s3.files(f"{BUCKET}/artifacts")
    names = {k.rsplit("/", 1)[-1] for k in stored if k.startswith(f"{BUCKET}/artifacts/jobs/{job_id}/")}
    assert {"pruned.safetensors", "masks.safetensors", "report.json", "curve.csv"} <= names, sorted(stored)
    arts = {a["name"]: a for a in s3_api.client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    for name, art in arts.items():
        assert stored[f"{BUCKET}/artifacts/jobs/{job_id}/{name}"] == art["size"], name
    assert any(k.startswith(f"{BUCKET}/artifacts/models/") for k in stored), sorted(stored)
    assert any(k.startswith(f"{BUCKET}/artifacts/datasets/") for k in stored), sorted(stored)
    # Checkpoints were written to the bucket during the run (a "checkpoint" event each) and deleted on success;
    # nothing half-written or staged is left.
    assert not [k for k in stored if "/checkpoints/" in k or "/staging/" in k or ".tmp-" in k], sorted(stored)
    # The worker kept nothing on its own disk: its scratch went away with the job.
    assert _local_files(host_dirs / "solo") == []
    worker.stop()


def _worker_of(pg_url: str, job_id: str) -> str:
    """The worker that holds (or last held) the job, as the database records it."""
    from core.service.db import jobs
    from core.service.db.base import make_engine, make_sessionmaker

    engine = make_engine(pg_url)
    try:
        with make_sessionmaker(engine)() as session:
            return jobs.get_unscoped(session=session, job_id=job_id).worker or ""
    finally:
        engine.dispose()


def test_worker_killed_resumes_on_another_host_from_the_s3_checkpoint(
    s3: S3Server, s3_api: Api, s3_pg_url: str, digits_files: DigitsFiles, start_host: Callable[[str], Proc]
) -> None:
    api = s3_api
    first = start_host("host-a")
    model_id, dataset_id = api.upload(digits_files)
    spec = job_spec(epochs=12, batch_size=2)  # many small steps: long enough to be killed between two epochs
    job_id = api.submit(model_id, dataset_id, spec)["id"]

    checkpoint = None
    for kind, event in sse_events(api.client, job_id, timeout=180):
        if kind == "checkpoint" and event["data"]["phase"] == "trained" and event["data"]["epoch"] >= 1:
            checkpoint = event
            break
        assert kind != "end", f"job ended before a fine-tuning checkpoint: {event}\n{api.diagnostics()}"
    assert checkpoint is not None
    assert f"{BUCKET}/artifacts/checkpoints/{job_id}/latest.json" in s3.files(f"{BUCKET}/artifacts/checkpoints")
    first.kill_group(signal.SIGKILL)  # the worker and its pool child, like a lost host
    assert first.popen is not None
    first.popen.wait(10)
    running = api.job(job_id)
    assert running["state"] == "running" and running["attempts"] == 1, running
    assert _worker_of(s3_pg_url, job_id).startswith("host-a@"), "the job did not start on host A"
    assert running["progress"] < 0.9, f"job nearly done before the kill; make it longer: {running}"

    second = start_host("host-b")  # another working directory and TMPDIR: it sees only the bucket
    done = api.wait_state(job_id, {"succeeded", "failed", "canceled"}, timeout=240)
    assert done["state"] == "succeeded" and done["attempts"] == 2, done
    events = list(sse_events(api.client, job_id, timeout=30))
    resumed = [e for k, e in events if k == "resumed"]
    assert resumed and resumed[0]["data"]["epoch"] >= checkpoint["data"]["epoch"], [k for k, _ in events]
    assert _worker_of(s3_pg_url, job_id).startswith("host-b@"), "the job did not finish on host B"
    assert not s3.files(f"{BUCKET}/artifacts/checkpoints/{job_id}"), "the checkpoint outlived the job"

    # The same spec, uninterrupted (on host B): the very same weights.
    reference = api.submit(model_id, dataset_id, spec)["id"]
    ref = api.wait_state(reference, {"succeeded", "failed", "canceled"}, timeout=240)
    assert ref["state"] == "succeeded" and ref["attempts"] == 1, ref
    resumed_weights = load(api.download(job_id, "pruned.safetensors"))
    reference_weights = load(api.download(reference, "pruned.safetensors"))
    assert resumed_weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        assert resumed_weights[name].equal(tensor), f"{name} differs from the uninterrupted run"
    second.stop()
