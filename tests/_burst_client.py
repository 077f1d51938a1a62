"""The clients of a burst, in a process of their own, on raw sockets: their CPU time is neither the server's GIL
time nor an HTTP library's (with httpx, a thousand concurrent requests took ~11 s to be answered, ~3 s with these).

``python _burst_client.py '<json>'`` with ``base_url``, ``key``, ``kinds``, ``n``, ``body`` (of a job creation)
and ``job_id``: ``n`` clients per kind at once, each on a connection of its own (``Connection: close``). It prints
``opened`` once every event stream has its response headers (each stream is then read to its end, or for
``STREAM_S`` at most), then one JSON line: the answers, each ``{kind, status (null: a transport error), elapsed
(s, to the response headers), retry_after, media_type, error}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

TIMEOUT_S = 20.0  # later than the tests' bound: a slow answer shows as slow, not as a transport error
STREAM_S = 3.0  # an event stream is read this long at most (then closed), or until the server ends it


class Streams:
    """Counts the event streams still waiting for their headers; says ``opened`` when none is."""

    def __init__(self, n: int):
        self.waiting = n
        if not n:
            self.opened()

    def one_opened(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.opened()

    @staticmethod
    def opened() -> None:
        print("opened", flush=True)


def _raw(method: str, path: str, host: str, key: str, body: dict | None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {key}", "Connection: close"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def _exchange(host: str, port: int, raw: bytes, on_head: Any = None) -> tuple[int, dict[str, str], float]:
    """Sends ``raw`` on a new connection; the status and headers, the time to them; then reads to the end."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        elapsed = time.perf_counter() - start
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
        if on_head is not None:
            on_head()
        try:  # the body (the server closes the connection after it), or as much of a stream as comes in STREAM_S
            async with asyncio.timeout(STREAM_S if on_head is not None else None):
                while await reader.read(1 << 16):
                    pass
        except TimeoutError:
            pass
        return status, headers, elapsed
    finally:
        writer.close()


async def _one(kind: str, host: str, port: int, raw: bytes, on_head: Any = None) -> dict[str, Any]:
    start = time.perf_counter()
    answer: dict[str, Any] = {"kind": kind, "status": None, "retry_after": None, "media_type": "", "error": None}
    try:
        status, headers, elapsed = await asyncio.wait_for(_exchange(host, port, raw, on_head), TIMEOUT_S)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        return {**answer, "elapsed": time.perf_counter() - start, "error": repr(exc)}
    finally:
        if on_head is not None:  # a stream that failed before its headers is not waited for
            on_head()
    return {
        **answer,
        "status": status,
        "elapsed": elapsed,
        "retry_after": headers.get("retry-after"),
        "media_type": headers.get("content-type", ""),
    }


async def burst(base_url: str, key: str, kinds: list[str], n: int, body: dict, job_id: str) -> list[dict[str, Any]]:
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    streams = Streams(n if "events" in kinds else 0)
    opened: set[int] = set()

    def stream_opened(i: int) -> Any:
        def mark() -> None:
            if i not in opened:
                opened.add(i)
                streams.one_opened()

        return mark

    job_url = f"/v1/jobs/{job_id}"
    requests = {
        "models": _raw("GET", "/v1/models", url.netloc, key, None),
        "create": _raw("POST", "/v1/jobs", url.netloc, key, body),
        "events": _raw("GET", f"{job_url}/events", url.netloc, key, None),
        "status": _raw("GET", job_url, url.netloc, key, None),
        "health": _raw("GET", "/healthz", url.netloc, key, None),
    }
    calls = []
    for kind in kinds:
        for i in range(n):
            mark = stream_opened(i) if kind == "events" else None
            calls.append(_one(kind, host, port, requests[kind], mark))
    return list(await asyncio.gather(*calls))


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    print(json.dumps(asyncio.run(burst(**args))), flush=True)
