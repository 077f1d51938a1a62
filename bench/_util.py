"""Shared bench helpers: min-of-repeats timing, environment record, peak RSS, a free port.

torch is imported where it is used: the service benches (load, upload_rss) and their client processes do not pay
for it.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def timeit(fn, repeats: int = 3) -> float:
    """Minimum wall time over repeats (after one warm-up when repeats > 1), synchronising CUDA."""
    import torch

    best = float("inf")
    for i in range(repeats + (1 if repeats > 1 else 0)):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if repeats == 1 or i > 0:
            best = min(best, time.perf_counter() - t)
    return best


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS had free a moment ago: for a server the bench starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(server, base: str, log: Path, timeout: float = 120.0, poll: float = 0.3) -> None:
    """Wait until the ``arborist serve`` process ``server`` (a Popen) answers ``GET {base}/readyz`` with 200; a
    RuntimeError naming ``log`` if it exits first, or after ``timeout`` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited; see {log}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(poll)


def save(name: str, rows: list[dict]) -> Path:
    import torch

    RESULTS.mkdir(exist_ok=True)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    (RESULTS / "environment.json").write_text(json.dumps(env, indent=2))
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2))
    return path
