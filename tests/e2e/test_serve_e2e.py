"""End to end on the embedded mode: ``python -m cli.serve`` (API + embedded worker, SQLite, no Redis).

1. The happy path, as on the Celery stack, then a clean Ctrl-C.
2. Restarts: a job is released by a Ctrl-C and resumes on the next start; then ``arborist serve`` alone is SIGKILLed
   mid-job: its worker and the job process die with it, and the next start sweeps the leftovers of killed writes,
   requeues the job at once and finishes it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from _e2e_kit import (
    HEARTBEAT_TIMEOUT_S,
    REAPER_INTERVAL_S,
    Api,
    DigitsFiles,
    Proc,
    base_env,
    check_pruned_model,
    child_pids,
    create_key,
    free_port,
    happy_path,
    job_spec,
    sse_events,
    wait_for,
)

ServeFactory = Callable[..., tuple[str, Proc]]


@pytest.fixture
def start_serve() -> Iterator[ServeFactory]:
    """Starts ``python -m cli.serve`` on a data directory; every server (and its worker) is killed afterwards."""
    procs: list[Proc] = []

    def start(data_dir: Path, **settings: object) -> tuple[str, Proc]:
        port = free_port()
        # A broker URL in the environment must not matter: serve is always embedded.
        env = base_env(
            broker_url="redis://127.0.0.1:1/0",
            heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
            reaper_interval_s=REAPER_INTERVAL_S,
            sse_poll_interval_s=0.2,
            **settings,
        )
        proc = Proc(
            f"serve-{len(procs)}",
            [
                sys.executable,
                "-m",
                "cli.serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                "--log-level",
                "warning",
            ],
            env,
            data_dir / f"serve-{len(procs)}.log",
        ).start()
        procs.append(proc)
        wait_for(
            lambda: "Create an API key" in proc.log(50_000), timeout=90, what="serve's banner", on_timeout=proc.describe
        )
        return f"http://127.0.0.1:{port}", proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.stop(grace=20)
            _kill_worker_groups(proc)


def _kill_worker_groups(proc: Proc) -> None:
    """serve starts its worker in a session of its own: find and kill it by its parent's pid."""
    for pid in _children(proc.pid):
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _children(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (serve starts its worker from a thread of its own)."""
    try:
        return child_pids(pid)
    except OSError:
        return []


def _client(base: str, data_dir: Path, key: str | None = None) -> tuple[httpx.Client, str]:
    key = key or create_key(f"sqlite:///{data_dir / 'arborist.db'}", f"serve-{uuid.uuid4().hex[:6]}")
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30), key


def _wait_checkpoint(api: Api, job_id: str, *, after_epoch: int) -> dict:
    for kind, event in sse_events(api.client, job_id, timeout=120):
        if kind == "checkpoint" and event["data"]["phase"] == "trained" and event["data"]["epoch"] >= after_epoch:
            return event
        assert kind != "end", f"job ended before epoch {after_epoch}: {event}\n{api.diagnostics()}"
    raise AssertionError("no checkpoint")


def test_serve_happy_path(
    start_serve: ServeFactory, digits_files: DigitsFiles, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data_dir = tmp_path_factory.mktemp("serve")
    base, proc = start_serve(data_dir)
    banner = proc.log(50_000)
    assert f"Arborist is running at {base}" in banner and "arborist keys create" in banner, banner
    assert (data_dir / "arborist.db").exists()
    assert httpx.get(f"{base}/readyz", timeout=5).json()["checks"] == {"database": True, "queue": True}

    client, _ = _client(base, data_dir)
    with client:
        job = happy_path(Api(client, proc.describe), digits_files, timeout=150)
    stored = {p.name for p in (data_dir / "artifacts" / "jobs" / job["id"]).iterdir()}
    assert {"pruned.safetensors", "report.json"} <= stored
    assert not (data_dir / "artifacts" / "checkpoints" / job["id"]).exists()  # removed after success

    proc.popen.send_signal(signal.SIGINT)  # Ctrl-C: the API stops, then the worker; a clean exit
    assert proc.popen.wait(60) == 0, proc.describe()


def test_serve_keeps_an_explicit_artifact_root_on_s3(
    start_serve: ServeFactory, digits_files: DigitsFiles, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issue #19: ``arborist serve`` replaced ARBORIST_ARTIFACT_ROOT with ``<data-dir>/artifacts`` (a job's
    artifacts went to local disk, none to the configured bucket). The setting wins: everything goes to the bucket."""
    from _s3 import moto_s3

    data_dir = tmp_path_factory.mktemp("serve-s3")
    with moto_s3("serve-bucket") as s3:
        base, proc = start_serve(data_dir, artifact_root="s3://serve-bucket/arborist")
        assert "artifacts: s3://serve-bucket/arborist" in proc.log(50_000)
        client, _ = _client(base, data_dir)
        with client:
            job = happy_path(Api(client, proc.describe), digits_files, timeout=150)
        stored = {k.rsplit("/", 1)[-1] for k in s3.files(f"serve-bucket/arborist/jobs/{job['id']}")}
        assert {"pruned.safetensors", "masks.safetensors", "report.json"} <= stored, stored
        assert any("/models/" in k for k in s3.files("serve-bucket/arborist"))
        assert not (data_dir / "artifacts").exists()  # nothing on local disk
        proc.popen.send_signal(signal.SIGINT)
        assert proc.popen.wait(60) == 0, proc.describe()


def test_serve_restarts_resume_jobs(
    start_serve: ServeFactory, digits_files: DigitsFiles, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data_dir = tmp_path_factory.mktemp("serve-restart")

    # 1. Ctrl-C while a job runs: the job is released (queued) and the server exits cleanly.
    base, proc = start_serve(data_dir)
    client, key = _client(base, data_dir)
    with client:
        api = Api(client, proc.describe)
        model_id, dataset_id = api.upload(digits_files)
        job_id = api.submit(model_id, dataset_id, job_spec(epochs=25, batch_size=2))["id"]
        _wait_checkpoint(api, job_id, after_epoch=1)
    proc.popen.send_signal(signal.SIGINT)
    assert proc.popen.wait(60) == 0, proc.describe()

    # 2. Next start: it resumes (attempt 2) and saves a checkpoint of its own; then `arborist serve` alone is
    #    SIGKILLed. Its worker (a session of its own) and the job process must die with it, not run on unowned.
    base, proc = start_serve(data_dir)
    client, _ = _client(base, data_dir, key)
    with client:
        api = Api(client, proc.describe)
        released = api.job(job_id)
        assert released["state"] in ("queued", "running"), released
        running = api.wait_state(job_id, {"running"}, timeout=60)
        assert running["attempts"] == 2, running
        # Attempt 1 may have got further than epoch 1 before it stopped (a loaded machine): wait for this attempt's
        # own `resumed` event and a checkpoint after it, not for an epoch number attempt 1 may have reached.
        resumed_from, saved = _wait_resumed_then_checkpoint(api, job_id)
    tree = _descendants(proc.pid)
    assert len(tree) >= 3, f"expected the worker, its fork server and the job process: {tree}\n{proc.describe()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.popen.wait(10)
    wait_for(lambda: not [p for p in tree if _running(p)], timeout=15, what="serve's processes to die with it")

    # Leftovers of killed writes, old enough to sweep (the start-up sweep: api.housekeeping)
    leftovers = [
        data_dir / "artifacts" / "staging" / "ten_x" / "0123456789abcdef0123456789abcdef.npz",
        data_dir / "artifacts" / "jobs" / job_id / "curve.png.tmp-0123456789abcdef0123456789abcdef",
    ]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 4096)
        os.utime(path, (time.time() - 7200, time.time() - 7200))

    # 3. Next start: the dead job process is noticed at once (same host, pid gone), the job resumes and succeeds.
    base, proc = start_serve(data_dir)
    client, _ = _client(base, data_dir, key)
    with client:
        api = Api(client, proc.describe)
        done = api.wait_state(job_id, {"succeeded", "failed", "canceled"}, timeout=150)
        assert done["state"] == "succeeded" and done["attempts"] == 3, done
        events = list(sse_events(client, job_id, timeout=30))
        requeues = [e["data"] for k, e in events if k == "state" and e["data"]["state"] == "queued"]
        assert [r.get("reason") for r in requeues[1:]] == [
            "the embedded worker is shutting down",
            "its embedded worker process exited",
        ], requeues
        resumed = [e["data"]["epoch"] for k, e in events if k == "resumed"]
        assert resumed[0] == resumed_from >= 1 and len(resumed) == 2 and resumed[1] >= saved > resumed[0], resumed
        metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
        assert len({(m["step"], m["kind"]) for m in metrics}) == len(metrics) == 27
        check_pruned_model(api.download(job_id, "pruned.safetensors"), digits_files)
    assert [p for p in leftovers if p.exists()] == []


def _wait_resumed_then_checkpoint(api: Api, job_id: str) -> tuple[int, int]:
    """The epoch the running attempt resumed from (its ``resumed`` event: the first one, as the job resumed only
    once so far), and that of the first checkpoint it saved after it."""
    resumed_from = None
    for kind, event in sse_events(api.client, job_id, timeout=120):
        if kind == "resumed":
            resumed_from = event["data"]["epoch"]
        elif kind == "checkpoint" and resumed_from is not None and event["data"]["epoch"] > resumed_from:
            return resumed_from, event["data"]["epoch"]
        assert kind != "end", f"job ended before it resumed and saved a checkpoint: {event}\n{api.diagnostics()}"
    raise AssertionError("no checkpoint after the resume")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    out, todo = [], _children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(_children(child))
    return out


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an orphan may wait for a reaper that never comes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
