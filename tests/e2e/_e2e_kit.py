"""Helpers for the end-to-end tests: subprocesses that are always killed, bounded waits, an SSE reader, and the
client side of a pruning job (upload, submit, follow, download, check)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from _net import free_port
from core.service.settings import env_vars

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
T = TypeVar("T")

MLP_KWARGS = {"in_features": 64, "hidden": [32], "num_classes": 10}
# Short timeouts so a killed worker is noticed within seconds.
HEARTBEAT_TIMEOUT_S = 4.0
REAPER_INTERVAL_S = 1.0


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Polls ``predicate`` until it returns something truthy; fails with ``what`` (and extra context)."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (httpx.HTTPError, OSError) as exc:
            last_exc = exc
        time.sleep(interval)
    extra = on_timeout() if on_timeout else ""
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}"
        + (f" (last error: {last_exc!r})" if last_exc else "")
        + (f"\n{extra}" if extra else "")
    )


@dataclass
class Proc:
    """A subprocess in its own session (so a kill reaches its children too), logging to a file."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: Path = ROOT
    popen: subprocess.Popen[bytes] | None = None
    _log: Any = None

    def start(self) -> Proc:
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            self.cmd, env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left; always closes the log."""
        if self.popen is not None:
            if self.popen.poll() is None:
                self.kill_group(signal.SIGTERM)
                try:
                    self.popen.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            self.kill_group(signal.SIGKILL)  # children may outlive the leader
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def describe(self) -> str:
        code = None if self.popen is None else self.popen.poll()
        return f"--- {self.name} (pid {self.pid if self.popen else '-'}, exit {code}) log tail ---\n{self.log()}"


def base_env(**arborist: Any) -> dict[str, str]:
    """The parent's environment without ARBORIST_* variables, plus the given settings and one thread per op."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBORIST_")}
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    env.update(env_vars({"latency_budget_s": 0.1} | arborist))  # every job measures its latency: briefly here
    return env


def start_celery_worker(
    name: str, env: dict[str, str], log_dir: Path, processes: list[Proc], *, cwd: Path = ROOT
) -> Proc:
    """Starts ``celery worker`` (node ``<name>@e2e``, queues cpu and gpu, one job at a time) in ``cwd`` and waits
    until it is ready; it is added to ``processes`` (killed at the end whatever happens)."""
    proc = Proc(
        f"celery {name}",
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
            f"{name}@e2e",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "INFO",
        ],
        env,
        log_dir / f"celery-{name}.log",
        cwd=cwd,
    ).start()
    processes.append(proc)

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"celery worker {name} exited\n{proc.describe()}")
        return " ready." in proc.log(200_000)

    wait_for(ready, timeout=90, what=f"celery worker {name} to be ready", on_timeout=proc.describe)
    return proc


# --- SSE ---------------------------------------------------------------------------------------------------------


@dataclass
class SseEvent:
    id: int | None
    kind: str
    data: dict


def sse_connect(
    client: httpx.Client,
    job_id: str,
    *,
    last_event_id: int | None = None,
    after: int | None = None,
    timeout: float = 60.0,
) -> Iterator[SseEvent]:
    """One connection to ``GET /v1/jobs/{id}/events`` (from ``after``, or with ``Last-Event-ID`` when given),
    yielding events until the server ends the stream (after ``end``, or without it: then reconnect). A broken
    connection raises ``httpx`` errors; a stream still open after ``timeout`` fails the test."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    params = {"after": after} if after is not None else {}
    deadline = time.monotonic() + timeout
    with client.stream(
        "GET",
        f"/v1/jobs/{job_id}/events",
        headers=headers,
        params=params,
        timeout=httpx.Timeout(10.0, read=max(timeout, 1.0)),
    ) as resp:
        assert resp.status_code == 200, resp.read().decode()
        assert resp.headers["content-type"].startswith("text/event-stream")
        event_id, kind, data = None, "message", []
        for line in resp.iter_lines():
            if time.monotonic() > deadline:
                raise AssertionError(f"events of job {job_id} did not end within {timeout:.0f}s")
            if line == "":
                if data:
                    yield SseEvent(event_id, kind, json.loads("\n".join(data)))
                    if kind == "end":
                        return
                event_id, kind, data = None, "message", []
            elif line.startswith("id:"):
                event_id = int(line[3:].strip())
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())


def sse_events(client: httpx.Client, job_id: str, *, timeout: float, after: int = 0) -> Iterator[tuple[str, dict]]:
    """Yields ``(event, data)`` from ``GET /v1/jobs/{id}/events`` until ``end`` (inclusive) or ``timeout``."""
    for event in sse_connect(client, job_id, after=after, timeout=timeout):
        yield event.kind, event.data


# --- the job, from the client's side --------------------------------------------------------------------------------


@dataclass
class DigitsFiles:
    model: Path
    dataset: Path
    x: Any
    y: Any


def make_digits_files(directory: Path, epochs: int = 25) -> DigitsFiles:
    """A tiny zoo MLP trained on the built-in digits, saved as safetensors, and the data as .npz."""
    import numpy as np
    import torch

    from core.io.data import builtin_dataset
    from core.io.model_files import save_state_dict
    from core.io.zoo import build_model

    data = builtin_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp", **MLP_KWARGS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on busy shared cores: more threads only contend
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(data.x_train), generator=gen)
            for i in range(0, len(perm), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    directory.mkdir(parents=True, exist_ok=True)
    model_path = save_state_dict(model.state_dict(), directory / "digits-mlp.safetensors")
    dataset_path = directory / "digits.npz"
    np.savez(dataset_path, x=data.x_train.numpy(), y=data.y_train.numpy())
    return DigitsFiles(model=model_path, dataset=dataset_path, x=data.x_train, y=data.y_train)


def job_spec(*, epochs: int, batch_size: int = 16) -> dict[str, Any]:
    return {
        "method": "woodfisher",
        "sparsity": 0.8,
        "fisher": {"samples": 256, "lambda": 1e-3},
        "finetune": {"epochs": epochs, "batch_size": batch_size, "lr": 0.01},
        "device": "cpu",
        "seed": 0,
    }


@dataclass
class Api:
    client: httpx.Client
    diagnostics: Callable[[], str] = field(default=lambda: "")

    def upload(self, files: DigitsFiles) -> tuple[str, str]:
        with open(files.model, "rb") as fh:
            r = self.client.post(
                "/v1/models",
                files={"file": (files.model.name, fh, "application/octet-stream")},
                data={"name": "digits-mlp", "arch": "mlp", "arch_kwargs": json.dumps(MLP_KWARGS)},
            )
        assert r.status_code == 201, r.text
        model_id = r.json()["id"]
        with open(files.dataset, "rb") as fh:
            r = self.client.post(
                "/v1/datasets",
                files={"file": (files.dataset.name, fh, "application/octet-stream")},
                data={"name": "digits"},
            )
        assert r.status_code == 201, r.text
        assert r.json()["num_examples"] == len(files.y)
        return model_id, r.json()["id"]

    def submit(self, model_id: str, dataset_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": spec})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["state"] == "queued" and job["queue"] == "cpu", job
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def reached() -> dict[str, Any] | None:
            nonlocal last
            last = self.job(job_id)
            return last if last["state"] in states else None

        return wait_for(
            reached,
            timeout=timeout,
            what=f"job {job_id} to reach {sorted(states)}",
            interval=0.3,
            on_timeout=lambda: f"last seen: {json.dumps(last)[:1500]}\n{self.diagnostics()}",
        )

    def events(self, job_id: str, timeout: float) -> list[tuple[str, dict]]:
        return list(sse_events(self.client, job_id, timeout=timeout))

    def download(self, job_id: str, name: str) -> bytes:
        import hashlib

        r = self.client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert r.status_code == 200, r.text
        assert hashlib.sha256(r.content).hexdigest() == r.headers["x-checksum-sha256"]
        return r.content


def check_pruned_model(
    blob: bytes, files: DigitsFiles, *, sparsity: float = 0.8, min_accuracy: float = 0.85
) -> tuple[float, float]:
    """Loads the downloaded safetensors into the MLP; returns ``(weight sparsity, accuracy on digits)``."""
    import torch
    from safetensors.torch import load

    from core.io.zoo import build_model

    state = load(blob)
    weights = [v for k, v in state.items() if k.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    measured = zeros / total
    model = build_model("mlp", **MLP_KWARGS)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(files.x).argmax(-1) == files.y).float().mean())
    assert abs(measured - sparsity) < 0.01, f"weight sparsity {measured:.4f}, expected {sparsity}"
    assert accuracy >= min_accuracy, f"pruned accuracy {accuracy:.3f} < {min_accuracy}"
    return measured, accuracy


def create_key(database_url: str, tenant: str) -> str:
    """``arborist keys create`` (cli/admin.py), run in-process with click's runner."""
    from click.testing import CliRunner

    from cli.admin import keys

    result = CliRunner().invoke(keys, ["create", "--tenant", tenant, "--url", database_url])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[0]
    assert key.startswith("arb_"), result.output
    return key


def happy_path(api: Api, files: DigitsFiles, *, timeout: float = 120.0) -> dict[str, Any]:
    """Upload, submit, follow the events to the end, check the job and the pruned model; returns the job."""
    model_id, dataset_id = api.upload(files)
    job = api.submit(model_id, dataset_id, job_spec(epochs=3))
    events = api.events(job["id"], timeout=timeout)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "end" and events[-1][1]["state"] == "succeeded", (events[-5:], api.diagnostics())
    states = [d["data"]["state"] for k, d in events if k == "state"]
    assert states[0] == "queued" and "running" in states and states[-1] == "succeeded", states
    for kind in ("started", "pruned", "checkpoint", "progress", "artifact"):
        assert kind in kinds, f"no {kind!r} event in {kinds}"
    seqs = [d["seq"] for k, d in events if k != "end"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    done = api.job(job["id"])
    assert done["state"] == "succeeded" and done["progress"] == 1.0 and done["attempts"] == 1, done
    assert done["error"] is None and done["result"]["sparsity"]["target"] == 0.8
    arts = api.client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    names = {a["name"] for a in arts}
    assert {"pruned.safetensors", "masks.safetensors", "compressed.safetensors", "report.json", "curve.csv"} <= names
    assert all(a["size"] > 0 and len(a["sha256"]) == 64 for a in arts)
    metrics = api.client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
    assert [m["kind"] for m in metrics][:2] == ["dense", "prune"] and len(metrics) == 5, metrics
    pruned = api.download(job["id"], "pruned.safetensors")
    check_pruned_model(pruned, files)
    report = json.loads(api.download(job["id"], "report.json"))
    assert report["method"] == "woodfisher" and report["lambda"] == 1e-3
    check_speed_and_size(report, api.download(job["id"], "compressed.safetensors"), pruned)
    return done


def check_speed_and_size(report: dict, compressed: bytes, pruned: bytes) -> None:
    """The report's measured latency (dense and pruned, per runtime and batch) and sizes; the compressed artifact
    decompresses to the pruned weights."""
    import tempfile

    import torch
    from safetensors.torch import load

    from core.io.compressed import read_compressed

    for runtime in ("torch_cpu", "onnxruntime_cpu"):
        entry = report["speed"]["runtimes"][runtime]
        assert entry["verdict"] == "size only" and entry["speedup"], entry
        assert all(m["median_ms"] > 0 and m["repeats"] >= 1 for m in entry["pruned"].values()), entry
    size = report["size"]
    assert size["compressed_bytes"] == len(compressed) < size["pruned_safetensors_bytes"] == len(pruned), size
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(compressed)
        f.flush()
        back, want = read_compressed(f.name), load(pruned)
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)


# --- a restartable API server ----------------------------------------------------------------------------------


@dataclass
class ApiServer:
    """``uvicorn api.main:app`` on a fixed port, which can be stopped (any signal) and started again there."""

    env: dict[str, str]
    log_dir: Path
    processes: list[Proc]
    name: str = "api"
    log_level: str = "info"
    port: int = field(default_factory=free_port)
    proc: Proc | None = None
    starts: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> ApiServer:
        self.starts += 1
        self.proc = Proc(
            f"uvicorn {self.name}#{self.starts}",
            [
                str(VENV_BIN / "uvicorn"),
                "api.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                self.log_level,
            ],
            self.env,
            self.log_dir / f"uvicorn-{self.name}.log",
        ).start()
        self.processes.append(self.proc)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        proc = self.proc
        assert proc is not None

        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"uvicorn exited\n{proc.describe()}")
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200

        wait_for(ready, timeout=timeout, what=f"{proc.name} to be ready", on_timeout=proc.describe)

    def signal(self, sig: int, *, timeout: float = 30.0) -> float:
        """Sends ``sig`` to uvicorn (the process, as a supervisor would) and waits for it to exit; returns the
        seconds it took. Fails if it outlives ``timeout``."""
        assert self.proc is not None and self.proc.popen is not None
        started = time.monotonic()
        self.proc.popen.send_signal(sig)
        try:
            self.proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"uvicorn did not exit within {timeout:.0f}s of signal {sig}\n{self.proc.describe()}"
            ) from None
        took = time.monotonic() - started
        self.proc.stop(grace=0)  # closes the log (and kills anything left in its group)
        return took


def thread_nice(pid: int) -> set[int]:
    """The niceness of each thread of process ``pid`` (field 19 of /proc/<pid>/task/<tid>/stat)."""
    values = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        values.add(int(stat.rsplit(")", 1)[1].split()[16]))
    return values


def child_pids(pid: int) -> list[int]:
    return [
        int(c)
        for t in os.listdir(f"/proc/{pid}/task")
        for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()
    ]
