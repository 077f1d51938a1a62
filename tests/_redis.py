"""A dedicated Redis database for a test module or session, shared by the queue and end-to-end fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis


@contextmanager
def flushed_db(url: str) -> Iterator[redis.Redis]:
    """A client of the Redis database at ``url``, emptied before and after. Skips the test when Redis is
    unreachable."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        client.close()
        pytest.skip(f"Redis not reachable at {url}: {exc}")
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()
