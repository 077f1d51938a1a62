"""API load on loopback: status polls, listing, job creation and event streams against a real service.

What it does, in one command:

1. starts the service itself, as deployed:
   * ``--mode celery`` (default): ``uvicorn api.main:app`` as in the Dockerfile, PostgreSQL (a fresh schema,
     dropped at the end), Redis (db 12, flushed) and one ``celery worker -c 1``;
   * ``--mode embedded``: ``arborist serve`` (SQLite, API + embedded DB-polling worker, no Redis);
   * ``--mode both``: one after the other;
2. creates a tenant key (``arborist keys create``), uploads a digits MLP and the digits data, and submits a
   long fine-tuning job that is *running* during the whole load (it is canceled at the end);
3. drives the API for ``--duration`` seconds (after ``--warmup``) from separate client processes, each
   an asyncio loop over raw HTTP/1.1 keep-alive sockets (no HTTP library: the client must not be the
   bottleneck; its CPU time is reported):
   * ``poll``   GET /v1/jobs/{id} of the running job, ``--poll-rate`` req/s over ``--poll-conns`` sockets
     (open loop: each socket sends on a fixed schedule, and latency counts from the *scheduled* time, so a
     slow server cannot hide its queueing; ``--poll-rate 0`` = closed loop, as fast as the server answers);
   * ``list``   GET /v1/jobs?limit=20 at ``--list-rate``;
   * ``create`` POST /v1/jobs (a small magnitude job; they queue behind the running one) at ``--create-rate``;
   * ``sse``    ``--sse-streams`` concurrent GET /v1/jobs/{id}/events streams (reopened when they end):
     time to the response headers, events received, and the delivery lag of live events;
4. prints throughput, p50/p99/max latency and status counts (5xx and transport errors apart) per kind,
   with the CPU used by the API, the worker and the clients, and saves JSON under bench/results/.

Reading the table: ``req/s`` counts the responses that arrived inside the measured window (what the server
achieved, not what was offered); p50/p99/max are over the requests scheduled in the window; ``unsent`` counts what
an open-loop client never got to send because it fell more than 5 s behind. ``errors`` are transport failures
(timeouts, resets), apart from 5xx. ``≈ ms per request`` is the API's CPU time per answered request: busy
neighbours on the machine distort it less than throughput.

Benchmarks never assert: compare the summary with the targets (≥ 500 polls/s, p99 < 50 ms, no 5xx).
PostgreSQL and Redis: ``ARBORIST_TEST_PG_URL`` (default postgresql+psycopg://postgres@127.0.0.1:5432/test) and
``ARBORIST_BENCH_REDIS_URL`` (default redis://127.0.0.1:6379/12).

Usage:
    .venv/bin/python bench/load.py                      # celery mode, 20 s at 600 polls/s
    .venv/bin/python bench/load.py --mode both
    .venv/bin/python bench/load.py --poll-rate 0 --poll-conns 16   # closed loop: the saturation throughput
    .venv/bin/python bench/load.py --uvicorn-args="--workers 2"    # extra uvicorn options (celery mode; note the =)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._util import free_port  # noqa: E402 (after the sys.path line above)
from core.service.settings import env_vars  # noqa: E402

VENV_BIN = Path(sys.executable).parent

PG_URL = os.environ.get("ARBORIST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ARBORIST_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")  # db 12: this bench only
MLP_KWARGS = {"in_features": 64, "hidden": [32], "num_classes": 10}
REQUEST_TIMEOUT_S = 10.0
DRAIN_S = 5.0  # how far past the window an open-loop client may still catch up

# ================================================================================================ raw HTTP client


class Http:
    """One HTTP/1.1 keep-alive connection: writes a prepared request, reads one response (Content-Length or
    chunked). Enough for this API on loopback, and cheap: a few µs of Python per request."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def head(self, raw: bytes) -> tuple[int, dict[bytes, bytes]]:
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        self.writer.write(raw)
        block = await self.reader.readuntil(b"\r\n\r\n")
        lines = block.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
        return status, headers

    async def chunk(self) -> bytes:
        """The next chunk of a chunked body (b"" at the end)."""
        assert self.reader is not None
        size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def body(self, headers: dict[bytes, bytes]) -> bytes:
        assert self.reader is not None
        if b"content-length" in headers:
            body = await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while part := await self.chunk():
                parts.append(part)
            await self.reader.readuntil(b"\r\n")
            body = b"".join(parts)
        else:
            body = await self.reader.read()
            self.close()
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return body

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        status, headers = await self.head(raw)
        return status, await self.body(headers)


def build_request(
    method: str, path: str, host: str, key: str, body: bytes | None = None, accept: str = "application/json"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {key}", f"Accept: {accept}"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def clock() -> float:
    """Latencies need µs: uvloop's ``loop.time()`` only has ms resolution."""
    return time.perf_counter()


class Recorder:
    def __init__(self) -> None:
        self.lat: list[float] = []
        self.status: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.extra: dict[str, Any] = {}

    def dump(self) -> dict[str, Any]:
        return {"lat": self.lat, "status": dict(self.status), "errors": dict(self.errors), "extra": self.extra}


async def request_loop(
    http: Http,
    raw: bytes,
    rec: Recorder,
    *,
    t_start: float,
    t_measure: float,
    t_end: float,
    interval: float,
    offset: float,
    on_body: Any = None,
) -> None:
    """Sends ``raw`` every ``interval`` s from ``t_start`` (open loop, latency from the scheduled time;
    0 = closed loop). Only requests scheduled in [t_measure, t_end) are recorded (before: warm-up).
    ``extra["in_window"]`` counts the responses that arrived inside the window (the achieved throughput); an
    open loop that falls more than ``DRAIN_S`` behind stops, and counts what it never sent as ``unsent``."""
    due = t_start + offset
    rec.extra.setdefault("in_window", 0)
    rec.extra.setdefault("unsent", 0)
    if due >= t_end:
        return
    await asyncio.sleep(max(0.0, due - clock()))
    while True:
        now = clock()
        if interval:
            if due >= t_end:
                break
            if now > t_end + DRAIN_S:
                rec.extra["unsent"] += math.ceil((t_end - max(due, t_measure)) / interval)
                break
            if due > now:
                await asyncio.sleep(due - now)
            sched = due
            due += interval
        else:
            if now >= t_end:
                break
            sched = now
        counted = sched >= t_measure
        try:
            status, body = await asyncio.wait_for(http.request(raw), REQUEST_TIMEOUT_S)
        except (
            TimeoutError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            IndexError,
        ) as exc:
            http.close()
            if counted:
                rec.errors[type(exc).__name__] += 1
            await asyncio.sleep(0.05)
            continue
        done = clock()
        if t_measure <= done <= t_end:
            rec.extra["in_window"] += 1
        if counted:
            rec.lat.append(done - sched)
            rec.status[status] += 1
            if on_body is not None:
                on_body(status, body)


async def sse_loop(
    host: str, port: int, key: str, job_id: str, rec: Recorder, *, t_start: float, t_measure: float, t_end: float
) -> None:
    """Follows the job's events; reopens the stream when it ends. ``lat`` = time to the response headers."""
    await asyncio.sleep(max(0.0, t_start - clock()))
    after = 0
    events = live = 0
    lags: list[float] = rec.extra.setdefault("lag", [])
    while clock() < t_end:
        http = Http(host, port)
        raw = build_request(
            "GET", f"/v1/jobs/{job_id}/events?after={after}", f"{host}:{port}", key, accept="text/event-stream"
        )
        t0 = clock()
        opened_wall = time.time()
        counted = True  # every stream opened during the run (most open in the warm-up)
        try:
            status, headers = await asyncio.wait_for(http.head(raw), REQUEST_TIMEOUT_S)
            if counted:
                rec.lat.append(clock() - t0)
                rec.status[status] += 1
            if status != 200:
                await asyncio.wait_for(http.body(headers), REQUEST_TIMEOUT_S)
                http.close()
                await asyncio.sleep(0.5)
                continue
            buf = b""
            ended = False
            while not ended and clock() < t_end:
                try:
                    part = await asyncio.wait_for(http.chunk(), max(t_end - clock(), 0.01))
                except TimeoutError:
                    break
                if not part:
                    break
                buf += part
                while b"\n\n" in buf:
                    msg, buf = buf.split(b"\n\n", 1)
                    kind, data = None, None
                    for line in msg.split(b"\n"):
                        if line.startswith(b"event:"):
                            kind = line[6:].strip().decode()
                        elif line.startswith(b"data:"):
                            data = line[5:].strip()
                    if kind is None:
                        continue
                    if kind == "end":
                        ended = True
                        break
                    payload = json.loads(data or b"{}")
                    after = max(after, int(payload.get("seq", after)))
                    if clock() >= t_measure:
                        events += 1
                        created = payload.get("created_at")
                        if created:
                            from datetime import datetime

                            ts = datetime.fromisoformat(created).timestamp()
                            if ts >= opened_wall:  # a live event, not a replayed one
                                live += 1
                                lags.append(time.time() - ts)
        except (
            TimeoutError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            IndexError,
        ) as exc:
            if counted:
                rec.errors[type(exc).__name__] += 1
            await asyncio.sleep(0.2)
        finally:
            http.close()
        if ended:
            await asyncio.sleep(0.5)
    rec.extra["events"] = rec.extra.get("events", 0) + events
    rec.extra["live_events"] = rec.extra.get("live_events", 0) + live


def client_process(cfg: dict[str, Any]) -> dict[str, Any]:
    """One client process: runs its share of the load; returns the raw records and its own CPU time."""
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(_client_main(cfg))
    t = os.times()
    result["cpu_s"] = t.user + t.system
    return result


async def _client_main(cfg: dict[str, Any]) -> dict[str, Any]:
    host, port, key = cfg["host"], cfg["port"], cfg["key"]
    hostport = f"{host}:{port}"
    # wall-clock start shared by all client processes -> this loop's clock
    t_start = clock() + (cfg["start_wall"] - time.time())
    t_measure = t_start + cfg["warmup"]
    t_end = t_measure + cfg["duration"]
    recs: dict[str, Recorder] = {}
    tasks = []

    async def connected(n: int) -> list[Http]:
        conns = [Http(host, port) for _ in range(n)]
        await asyncio.gather(*(c.connect() for c in conns))
        return conns

    if cfg.get("poll_conns"):
        rec = recs["poll"] = Recorder()
        n, rate = cfg["poll_conns"], cfg["poll_rate"]
        raw = build_request("GET", f"/v1/jobs/{cfg['job_id']}", hostport, key)
        interval = n / rate if rate else 0.0
        for i, http in enumerate(await connected(n)):
            tasks.append(
                request_loop(
                    http,
                    raw,
                    rec,
                    t_start=t_start,
                    t_measure=t_measure,
                    t_end=t_end,
                    interval=interval,
                    offset=i * interval / n,
                )
            )
    if cfg.get("list_conns"):
        rec = recs["list"] = Recorder()
        n, rate = cfg["list_conns"], cfg["list_rate"]
        raw = build_request("GET", "/v1/jobs?limit=20", hostport, key)
        interval = n / rate if rate else 0.0
        for i, http in enumerate(await connected(n)):
            tasks.append(
                request_loop(
                    http,
                    raw,
                    rec,
                    t_start=t_start,
                    t_measure=t_measure,
                    t_end=t_end,
                    interval=interval,
                    offset=i * interval / n,
                )
            )
    if cfg.get("create_rate"):
        rec = recs["create"] = Recorder()
        created: list[str] = rec.extra.setdefault("ids", [])
        body = json.dumps(
            {
                "model_id": cfg["model_id"],
                "dataset_id": cfg["dataset_id"],
                "spec": {"method": "magnitude", "sparsity": 0.5, "device": "cpu"},
            }
        ).encode()
        raw = build_request("POST", "/v1/jobs", hostport, key, body)

        def keep_id(status: int, body: bytes) -> None:
            if status in (200, 202):
                created.append(json.loads(body)["id"])

        (http,) = await connected(1)
        tasks.append(
            request_loop(
                http,
                raw,
                rec,
                t_start=t_start,
                t_measure=t_measure,
                t_end=t_end,
                interval=1.0 / cfg["create_rate"],
                offset=0.0,
                on_body=keep_id,
            )
        )
    if cfg.get("sse_streams"):
        rec = recs["sse"] = Recorder()
        for _ in range(cfg["sse_streams"]):
            tasks.append(
                sse_loop(host, port, key, cfg["job_id"], rec, t_start=t_start, t_measure=t_measure, t_end=t_end)
            )
    await asyncio.gather(*tasks)
    return {kind: r.dump() for kind, r in recs.items()}


# ================================================================================================ the service


def wait_until(predicate: Any, timeout: float, what: str, procs: list[Any] = ()) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a service process exited (code {p.returncode}); see its log")
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 (not up yet)
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def service_env(**arborist: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBORIST_")}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    env.update(env_vars(arborist))
    return env


class Service:
    """The API (+ worker) as subprocesses in their own sessions; ``stop()`` kills every one of them."""

    def __init__(self, mode: str, workdir: Path, uvicorn_args: list[str]):
        self.mode, self.workdir, self.uvicorn_args = mode, workdir, uvicorn_args
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.schema: str | None = None
        self.database_url = ""
        self.api_pid = 0
        self.worker_pid = 0

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")
        self.logs.append(log)
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def start(self) -> None:
        import httpx

        if self.mode == "celery":
            self._start_celery()
        else:
            self._start_embedded()
        wait_until(
            lambda: httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200,
            90,
            "the API to be ready",
            self.procs,
        )

    def _start_celery(self) -> None:
        import redis
        import sqlalchemy as sa

        from core.service.db import migrate

        self.schema = f"arb_bench_{uuid.uuid4().hex[:12]}"
        engine = sa.create_engine(PG_URL)
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{self.schema}"'))
        engine.dispose()
        sep = "&" if "?" in PG_URL else "?"
        self.database_url = f"{PG_URL}{sep}options=-csearch_path%3D{self.schema}"
        migrate.upgrade(self.database_url)
        r = redis.Redis.from_url(REDIS_URL)
        r.flushdb()
        r.close()
        env = service_env(
            environment="dev",
            database_url=self.database_url,
            broker_url=REDIS_URL,
            artifact_root=str(self.workdir / "artifacts"),
            data_allowed_roots=[str(self.workdir / "datasets")],
        )
        # The Dockerfile's command, on loopback.
        api = self._spawn(
            "uvicorn",
            [
                str(VENV_BIN / "uvicorn"),
                "api.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--proxy-headers",
                *self.uvicorn_args,
            ],
            env,
        )
        self.api_pid = api.pid
        worker = self._spawn(
            "celery",
            [
                str(VENV_BIN / "celery"),
                "-A",
                "worker.celery_app",
                "worker",
                "-Q",
                "cpu,gpu",
                "-c",
                "1",
                "-P",
                "prefork",
                "-n",
                "bench@load",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "INFO",
            ],
            env,
        )
        self.worker_pid = worker.pid
        wait_until(
            lambda: " ready." in (self.workdir / "celery.log").read_text(errors="replace"),
            90,
            "the celery worker",
            self.procs,
        )

    def _start_embedded(self) -> None:
        data = self.workdir / "data"
        self.database_url = f"sqlite:///{data / 'arborist.db'}"
        env = service_env()
        p = self._spawn(
            "serve",
            [
                str(VENV_BIN / "arborist"),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                str(data),
            ],
            env,
        )
        self.api_pid = p.pid  # `arborist serve` runs uvicorn in-process, the worker is its child

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the API (uvicorn with its workers, or the `arborist serve` process itself) and
        of the worker (celery with its children, or the serve process's children: embedded worker and jobs)."""
        if self.mode == "celery":
            return {
                "api": usage(self.api_pid, tree=True)[0],
                "worker": usage(self.worker_pid, tree=True)[0],
                "postgres": postgres_cpu_s(),
            }
        api = usage(self.api_pid, tree=False)[0]
        return {"api": api, "worker": usage(self.api_pid, tree=True)[0] - api}

    def key(self) -> str:
        out = subprocess.run(
            [str(VENV_BIN / "arborist"), "keys", "create", "--tenant", "bench", "--url", self.database_url],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env=service_env(),
        )
        return out.stdout.strip().splitlines()[0]

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for log in self.logs:
            log.close()
        if self.schema:
            import sqlalchemy as sa

            engine = sa.create_engine(PG_URL)
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            engine.dispose()


def _proc_table() -> dict[int, tuple[int, float, float]]:
    """pid -> (parent pid, CPU seconds, RSS MB) of every live process."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(d.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick, int(f[21]) * page / 2**20)
    return table


def postgres_cpu_s() -> float:
    """CPU seconds of every PostgreSQL process on this machine (all its clients, not only this bench)."""
    table = _proc_table()
    total = 0.0
    for pid, row in table.items():
        try:
            if Path(f"/proc/{pid}/comm").read_text().startswith("postgres"):
                total += row[1]
        except OSError:
            pass
    return total


def usage(pid: int, tree: bool) -> tuple[float, float]:
    """(CPU seconds, RSS MB) of ``pid``, with its live descendants when ``tree``."""
    table = _proc_table()
    cpu = rss = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in table:
            cpu, rss = cpu + table[p][1], rss + table[p][2]
        if tree:
            todo += [c for c, row in table.items() if row[0] == p]
    return cpu, rss


# ================================================================================================ one run


def digits_files(directory: Path) -> tuple[Path, Path]:
    import numpy as np
    import torch

    from core.io.data import builtin_dataset
    from core.io.model_files import save_state_dict
    from core.io.zoo import build_model

    data = builtin_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", **MLP_KWARGS)
    model_path = save_state_dict(model.state_dict(), directory / "digits-mlp.safetensors")
    dataset_path = directory / "digits.npz"
    np.savez(dataset_path, x=data.x_train.numpy(), y=data.y_train.numpy())
    return model_path, dataset_path


def prepare(svc: Service, workdir: Path) -> dict[str, Any]:
    """Key, uploads, and a long job that is running when this returns."""
    import httpx

    key = svc.key()
    model_path, dataset_path = digits_files(workdir)
    with httpx.Client(base_url=svc.base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        with open(model_path, "rb") as fh:
            r = c.post(
                "/v1/models",
                files={"file": (model_path.name, fh)},
                data={"name": "digits-mlp", "arch": "mlp", "arch_kwargs": json.dumps(MLP_KWARGS)},
            )
        r.raise_for_status()
        model_id = r.json()["id"]
        with open(dataset_path, "rb") as fh:
            r = c.post("/v1/datasets", files={"file": (dataset_path.name, fh)}, data={"name": "digits"})
        r.raise_for_status()
        dataset_id = r.json()["id"]
        # Fine-tuning with small batches for up to 10,000 epochs: it runs (and emits events) until canceled.
        spec = {
            "method": "woodfisher",
            "sparsity": 0.8,
            "mode": "gradual",
            "schedule": {"initial_sparsity": 0.5, "end_epoch": 9000, "frequency": 1},
            "fisher": {"samples": 64, "lambda": 1e-3},
            "finetune": {"epochs": 10000, "batch_size": 16},
            "device": "cpu",
            "seed": 0,
        }
        r = c.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": spec})
        r.raise_for_status()
        job_id = r.json()["id"]
        wait_until(
            lambda: c.get(f"/v1/jobs/{job_id}").json()["state"] == "running", 120, "the long job to run", svc.procs
        )
    return {"key": key, "model_id": model_id, "dataset_id": dataset_id, "job_id": job_id}


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def summarise(kind: str, records: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    lat = sorted(x for r in records for x in r["lat"])
    status: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for r in records:
        status.update({int(k): v for k, v in r["status"].items()})
        errors.update(r["errors"])

    def ms(v):
        return None if v is None else round(v * 1000, 2)

    row = {
        "kind": kind,
        "requests": len(lat),
        "rate_per_s": round(sum(r["extra"].get("in_window", len(r["lat"])) for r in records) / duration, 1),
        "unsent": sum(r["extra"].get("unsent", 0) for r in records),
        "p50_ms": ms(percentile(lat, 50)),
        "p99_ms": ms(percentile(lat, 99)),
        "max_ms": ms(lat[-1] if lat else None),
        "2xx": sum(v for k, v in status.items() if 200 <= k < 300),
        "4xx": sum(v for k, v in status.items() if 400 <= k < 500),
        "5xx": sum(v for k, v in status.items() if k >= 500),
        "transport_errors": sum(errors.values()),
        "status": dict(status),
        "errors": dict(errors),
    }
    if kind == "sse":
        lags = sorted(x for r in records for x in r["extra"].get("lag", []))
        row.update(
            streams_opened=len(lat),
            events=sum(r["extra"].get("events", 0) for r in records),
            live_events=sum(r["extra"].get("live_events", 0) for r in records),
            live_lag_p50_ms=ms(percentile(lags, 50)),
            live_lag_p99_ms=ms(percentile(lags, 99)),
        )
    return row


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    workdir = Path(tempfile.mkdtemp(prefix=f"arborist-load-{mode}-"))
    svc = Service(mode, workdir, shlex.split(args.uvicorn_args) if mode == "celery" else [])
    print(f"[{mode}] starting the service (logs in {workdir}) ...", flush=True)
    try:
        svc.start()
        ids = prepare(svc, workdir)
        print(f"[{mode}] job {ids['job_id']} running; load for {args.warmup:.0f}+{args.duration:.0f} s ...", flush=True)
        base = {"host": "127.0.0.1", "port": svc.port, **ids, "warmup": args.warmup, "duration": args.duration}
        configs = []
        for i in range(args.poll_procs):
            share = args.poll_conns // args.poll_procs + (1 if i < args.poll_conns % args.poll_procs else 0)
            configs.append({**base, "poll_conns": share, "poll_rate": args.poll_rate * share / args.poll_conns})
        configs.append(
            {
                **base,
                "list_conns": args.list_conns,
                "list_rate": args.list_rate,
                "create_rate": args.create_rate,
                "sse_streams": args.sse_streams,
            }
        )
        import multiprocessing as mp

        with ProcessPoolExecutor(len(configs), mp_context=mp.get_context("spawn")) as pool:
            start_wall = time.time() + 3.0  # time for the client processes to start
            futures = [pool.submit(client_process, {**c, "start_wall": start_wall}) for c in configs]
            time.sleep(max(0.0, start_wall + args.warmup - time.time()))
            cpu0 = svc.cpu()
            t0 = time.monotonic()
            results = [f.result() for f in futures]
            elapsed = time.monotonic() - t0
            cpu1 = svc.cpu()
        rows = []
        for kind in ("poll", "list", "create", "sse"):
            recs = [r[kind] for r in results if kind in r]
            if recs:
                rows.append(summarise(kind, recs, args.duration))
        with httpx.Client(base_url=svc.base, headers={"Authorization": f"Bearer {ids['key']}"}, timeout=30) as c:
            job = c.get(f"/v1/jobs/{ids['job_id']}").json()
            created = [i for r in results for i in r.get("create", {}).get("extra", {}).get("ids", [])]
            for jid in [ids["job_id"], *created]:
                c.post(f"/v1/jobs/{jid}/cancel")
        # CPU over the window ≈ measured (the clients' own CPU includes their start and warm-up)
        resources = {
            "api_cpu_pct": round(100 * (cpu1["api"] - cpu0["api"]) / elapsed, 1),
            # the API's CPU time per answered request (all kinds): an efficiency measure that a busy machine skews less
            "api_cpu_ms_per_request": round(
                1000 * (cpu1["api"] - cpu0["api"]) / max(1, sum(r["requests"] for r in rows if r["kind"] != "sse")), 2
            ),
            "worker_cpu_pct": round(100 * (cpu1["worker"] - cpu0["worker"]) / elapsed, 1),
            "postgres_cpu_pct": round(100 * (cpu1["postgres"] - cpu0["postgres"]) / elapsed, 1)
            if "postgres" in cpu0
            else None,
            "client_cpu_s": round(sum(r["cpu_s"] for r in results), 2),
            "client_procs": len(results),
            "api_rss_mb": round(usage(svc.api_pid, tree=svc.mode == "celery")[1], 1),
            "job_state_at_end": job["state"],
            "job_progress_at_end": job["progress"],
        }
        return {"mode": mode, "rows": rows, "resources": resources}
    finally:
        svc.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def print_summary(res: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n=== {res['mode']}: {args.duration:.0f} s measured, poll offered "
        f"{'closed loop' if not args.poll_rate else f'{args.poll_rate:.0f}/s'} over {args.poll_conns} sockets ==="
    )
    head = (
        f"{'kind':<7}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'2xx':>7}{'4xx':>6}"
        f"{'5xx':>6}{'errors':>8}{'unsent':>8}"
    )
    print(head)
    for r in res["rows"]:
        print(
            f"{r['kind']:<7}{r['requests']:>9}{r['rate_per_s']:>9}{r['p50_ms'] or '-':>9}{r['p99_ms'] or '-':>9}"
            f"{r['max_ms'] or '-':>9}{r['2xx']:>7}{r['4xx']:>6}{r['5xx']:>6}{r['transport_errors']:>8}"
            f"{r['unsent']:>8}"
        )
    for r in res["rows"]:
        if r["kind"] == "sse":
            print(
                f"sse: {r['streams_opened']} streams opened (latency above = time to headers), {r['events']} "
                f"events, {r['live_events']} live; live-event lag p50 {r['live_lag_p50_ms']} ms, "
                f"p99 {r['live_lag_p99_ms']} ms"
            )
    rs = res["resources"]
    pg = f", postgres (all clients) {rs['postgres_cpu_pct']}%" if rs["postgres_cpu_pct"] is not None else ""
    print(
        f"cpu: api {rs['api_cpu_pct']}% (≈{rs['api_cpu_ms_per_request']} ms per request), "
        f"worker {rs['worker_cpu_pct']}%{pg}, clients {rs['client_cpu_s']} s in "
        f"{rs['client_procs']} processes; api rss {rs['api_rss_mb']} MB; long job {rs['job_state_at_end']} "
        f"at progress {rs['job_progress_at_end']:.3f}"
    )
    poll = next((r for r in res["rows"] if r["kind"] == "poll"), None)
    if poll:
        ok = poll["rate_per_s"] >= 500 and (poll["p99_ms"] or 1e9) < 50 and all(r["5xx"] == 0 for r in res["rows"])
        print(f"target (≥ 500 polls/s, p99 < 50 ms, no 5xx): {'met' if ok else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["celery", "embedded", "both"], default="celery")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before")
    ap.add_argument("--poll-rate", type=float, default=600.0, help="offered status polls/s (0 = closed loop)")
    ap.add_argument("--poll-conns", type=int, default=16)
    ap.add_argument("--poll-procs", type=int, default=1, help="client processes for the polls")
    ap.add_argument("--list-rate", type=float, default=20.0, help="GET /v1/jobs per s (0 = closed loop)")
    ap.add_argument("--list-conns", type=int, default=2)
    ap.add_argument("--create-rate", type=float, default=1.0, help="POST /v1/jobs per s")
    ap.add_argument("--sse-streams", type=int, default=4)
    ap.add_argument(
        "--uvicorn-args",
        default="",
        help="extra uvicorn options, celery mode (e.g. --uvicorn-args='--workers 2 --no-access-log')",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the service

    results = []
    for mode in ["celery", "embedded"] if args.mode == "both" else [args.mode]:
        res = run_mode(mode, args)
        print_summary(res, args)
        results.append(res)
    from bench._util import save

    rows = [
        {
            "mode": r["mode"],
            **row,
            **{f"res_{k}": v for k, v in r["resources"].items()},
            "config": {k: v for k, v in vars(args).items()},
        }
        for r in results
        for row in r["rows"]
    ]
    name = "load" if args.mode == "both" else f"load-{args.mode}"
    print(f"\nsaved {save(name, rows)}")


if __name__ == "__main__":
    main()
