"""Admission control for the database: a request waits for a slot on the event loop before it touches a pool.

Sync dependencies and endpoints run in the threadpool, one trip each, and a request keeps its pooled connection
from the first trip (authentication) to the last (the endpoint, the session's close). Without a bound, a burst
fills every thread with requests that wait for a connection while the requests holding the connections wait for a
thread: a deadlock that only the pool timeout broke. A ``Gate`` hands out no more slots than its pool has
connections for, and a request waits for its slot on the event loop, where waiting holds neither a thread nor a
connection. Waiting is bounded: past ``timeout_s`` the answer is 503 + Retry-After (the server is saturated).
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from core.errors import ServiceUnavailable


class Gate:
    """At most ``capacity`` holders at once; a waiter gives up after ``timeout_s`` (``ServiceUnavailable``).

    ``threads`` is a thread limiter of the same capacity: holders that run their work with it
    (``anyio.to_thread.run_sync(..., limiter=gate.threads)``) never wait for a thread of the shared threadpool,
    which a burst of other requests (or slow uploads) may have taken."""

    def __init__(self, name: str, capacity: int, timeout_s: float):
        self.name = name
        self.capacity = capacity
        self.timeout_s = timeout_s
        self._semaphore = anyio.Semaphore(capacity)
        self.threads = anyio.CapacityLimiter(capacity)

    async def acquire(self) -> Slot:
        """A slot, or ``ServiceUnavailable`` (503, Retry-After) when none came free within ``timeout_s``."""
        with anyio.move_on_after(self.timeout_s):
            await self._semaphore.acquire()
            return Slot(self._semaphore, asyncio.get_running_loop())
        raise ServiceUnavailable(
            f"The server is busy: no {self.name} slot came free within {self.timeout_s:g} s; retry shortly",
            retry_after_s=max(1, math.ceil(self.timeout_s)),
        )

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """A slot for the duration of the block."""
        slot = await self.acquire()
        try:
            yield
        finally:
            slot.release()


class Slot:
    """A slot taken from a ``Gate``; ``release`` gives it back once, from the event loop or from a worker thread
    (an endpoint that closes its session in the threadpool before it streams its response)."""

    def __init__(self, semaphore: anyio.Semaphore, loop: asyncio.AbstractEventLoop):
        self._semaphore = semaphore
        self._loop = loop
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # a worker thread: the semaphore belongs to the event loop
            on_loop = False
        if on_loop:
            self._semaphore.release()
        else:
            self._loop.call_soon_threadsafe(self._semaphore.release)
