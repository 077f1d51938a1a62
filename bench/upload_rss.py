"""Memory of a large upload: a 1 GiB dataset streamed to POST /v1/datasets must not grow the API process's RSS.

What it does, in one command:

1. starts the API (``arborist serve --no-worker``: uvicorn in-process, SQLite; the upload path is the same in the
   Celery deployment) with ``ARBORIST_MAX_UPLOAD_BYTES`` raised above the upload, and creates a key;
2. streams a valid safetensors dataset (``x``: float32 [N, 64], ``y``: int64 [N], ~``--gib`` GiB) from a generator,
   as a multipart body with a Content-Length, chunk by chunk: the client never holds more than one chunk;
3. samples the server's ``VmRSS`` (/proc/PID/status) every 20 ms while the upload is sent, stored, validated and
   registered, and reads ``VmHWM`` (the kernel's peak) before and after; also the peak of the largest process under
   the server (validation runs in a child process, api/isolation.py: its memory is reported, not hidden);
4. prints bytes, seconds, MB/s, RSS before / peak / after and the growth (target: < 100 MB), and saves JSON.

Usage: .venv/bin/python bench/upload_rss.py [--gib 1.0] [--chunk-mib 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._util import free_port, wait_ready  # noqa: E402 (after the sys.path line above)

VENV_BIN = Path(sys.executable).parent
FEATURES = 64
ROW_BYTES = FEATURES * 4 + 8  # one example: 64 float32 features and an int64 label


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [c for c, p in parents.items() if p == parent]
        out += kids
        todo += kids
    return out


class RssSampler(threading.Thread):
    """Peak VmRSS of the server process, and of the largest process under it (the upload validator's child)."""

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self.child_peak_kib = 0
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmRSS"))
                self.samples += 1
            except (OSError, RuntimeError):
                return
            for child in descendants(self.pid):
                try:
                    self.child_peak_kib = max(self.child_peak_kib, status_kib(child, "VmRSS"))
                except (OSError, RuntimeError):
                    pass
            time.sleep(self.interval)


def safetensors_stream(rows: int, chunk_bytes: int) -> tuple[int, Iterator[bytes]]:
    """A safetensors file with ``x`` [rows, 64] float32 and ``y`` [rows] int64, as (size, chunks). The data are
    generated chunk by chunk (finite features, labels 0..9), so nothing of the size of the file is ever held."""
    import numpy as np

    x_bytes, y_bytes = rows * FEATURES * 4, rows * 8
    header = {
        "x": {"dtype": "F32", "shape": [rows, FEATURES], "data_offsets": [0, x_bytes]},
        "y": {"dtype": "I64", "shape": [rows], "data_offsets": [x_bytes, x_bytes + y_bytes]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data start 8-byte aligned
    size = 8 + len(raw) + x_bytes + y_bytes

    def chunks() -> Iterator[bytes]:
        yield len(raw).to_bytes(8, "little") + raw
        rng = np.random.default_rng(0)
        per = max(1, chunk_bytes // (FEATURES * 4))
        for start in range(0, rows, per):
            n = min(per, rows - start)
            yield rng.standard_normal((n, FEATURES), dtype=np.float32).tobytes()
        per = max(1, chunk_bytes // 8)
        for start in range(0, rows, per):
            n = min(per, rows - start)
            yield (np.arange(start, start + n, dtype=np.int64) % 10).tobytes()

    return size, chunks()


def multipart(file_size: int, file_chunks: Iterator[bytes], name: str) -> tuple[str, int, Iterator[bytes]]:
    boundary = "arborist-bench-" + os.urandom(8).hex()
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        yield from file_chunks
        yield tail

    return f"multipart/form-data; boundary={boundary}", len(head) + file_size + len(tail), body()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="size of the uploaded file, GiB")
    ap.add_argument("--chunk-mib", type=float, default=1.0, help="client chunk size, MiB")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (server log)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server

    import httpx

    rows = int(args.gib * 2**30) // ROW_BYTES
    file_size, file_chunks = safetensors_stream(rows, int(args.chunk_mib * 2**20))
    workdir = Path(tempfile.mkdtemp(prefix="arborist-upload-rss-"))
    data_dir = workdir / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBORIST_")}
    env.update(
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        ARBORIST_MAX_UPLOAD_BYTES=str(file_size + 2**20),
    )
    log = open(workdir / "serve.log", "wb")
    server = subprocess.Popen(
        [
            str(VENV_BIN / "arborist"),
            "serve",
            "--no-worker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, base, workdir / "serve.log", timeout=90, poll=0.2)
        key = (
            subprocess.run(
                [
                    str(VENV_BIN / "arborist"),
                    "keys",
                    "create",
                    "--tenant",
                    "bench",
                    "--url",
                    f"sqlite:///{data_dir / 'arborist.db'}",
                ],
                capture_output=True,
                text=True,
                check=True,
                env=env,
                cwd=ROOT,
            )
            .stdout.strip()
            .splitlines()[0]
        )
        headers = {"Authorization": f"Bearer {key}"}
        # Warm-up: a tiny upload first, so lazy imports on the upload path are not counted as the big one's cost.
        small_size, small_chunks = safetensors_stream(1000, 2**20)
        ctype, length, body = multipart(small_size, small_chunks, "warmup")
        r = httpx.post(
            f"{base}/v1/datasets",
            content=body,
            timeout=120,
            headers={**headers, "Content-Type": ctype, "Content-Length": str(length)},
        )
        assert r.status_code == 201, r.text
        time.sleep(1.0)

        pid = server.pid  # `arborist serve` runs uvicorn in this process
        rss_before, hwm_before = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
        sampler = RssSampler(pid)
        sampler.start()
        ctype, length, body = multipart(file_size, file_chunks, "big")
        t0 = time.perf_counter()
        r = httpx.post(
            f"{base}/v1/datasets",
            content=body,
            timeout=httpx.Timeout(60.0, read=1800.0),
            headers={**headers, "Content-Type": ctype, "Content-Length": str(length)},
        )
        seconds = time.perf_counter() - t0
        time.sleep(0.5)
        sampler.stop.set()
        sampler.join()
        rss_after, hwm_after = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
        ok = r.status_code == 201

        def mib(kib):
            return round(kib / 1024, 1)

        row = {
            "status": r.status_code,
            "file_bytes": file_size,
            "body_bytes": length,
            "rows": rows,
            "seconds": round(seconds, 2),
            "mb_per_s": round(length / 1e6 / seconds, 1),
            "rss_before_mib": mib(rss_before),
            "rss_peak_mib": mib(sampler.peak_kib),
            "rss_after_mib": mib(rss_after),
            "hwm_before_mib": mib(hwm_before),
            "hwm_after_mib": mib(hwm_after),
            "rss_growth_mib": mib(max(sampler.peak_kib, hwm_after if hwm_after > hwm_before else 0) - rss_before),
            "largest_child_peak_mib": mib(sampler.child_peak_kib),
            "samples": sampler.samples,
            "chunk_mib": args.chunk_mib,
            "dataset": r.json() if ok else r.text[:2000],
        }
        print(f"upload: {'201 Created' if ok else f'FAILED {r.status_code}: {r.text[:500]}'}")
        print(f"bytes {length:,} (file {file_size:,}, {rows:,} examples) in {seconds:.1f} s = {row['mb_per_s']} MB/s")
        print(
            f"API RSS before {row['rss_before_mib']} MiB, peak {row['rss_peak_mib']} MiB (sampled every 20 ms; "
            f"VmHWM {row['hwm_before_mib']} -> {row['hwm_after_mib']} MiB), after {row['rss_after_mib']} MiB"
        )
        print(
            f"largest process under the API (the validation child, which loads the dataset to check it): peak "
            f"{row['largest_child_peak_mib']} MiB"
        )
        print(
            f"API RSS growth {row['rss_growth_mib']} MiB (target < 100 MB): "
            f"{'met' if ok and row['rss_growth_mib'] * 2**20 < 100e6 else 'NOT met'}"
        )
        from bench._util import save

        print(f"saved {save('upload-rss', [row])}")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)
        log.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
