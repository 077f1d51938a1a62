"""Requests per second per API key (the tenant's ``requests_per_s`` limit, ``core.service.limits``).

A token bucket per key, in this API process: it holds one second's worth of requests (at least one) and refills
at the limit's rate; a request finding it empty is refused with 429 + Retry-After (the seconds until a token is
back) and the limit in the body. With N API processes behind a balancer a key gets up to N times the rate: set the
limit per process accordingly.
"""

from __future__ import annotations

import math
import threading
import time

from core.errors import QuotaExceeded
from core.service.limits import limits_for
from core.service.settings import Settings


class RateLimiter:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key prefix → (tokens, at)
        self._names: dict[str, str] = {}  # tenant id → name (names never change), for the status poll

    @property
    def active(self) -> bool:
        """Whether any tenant has a rate limit (else nothing is counted)."""
        s = self.settings
        return s.tenant_requests_per_s is not None or any(
            lim.requests_per_s is not None for lim in s.tenant_limits.values()
        )

    def known_name(self, tenant_id: str) -> str | None:
        return self._names.get(tenant_id)

    def check(self, key_prefix: str, tenant_id: str, tenant_name: str) -> None:
        """Takes a token from the key's bucket; ``QuotaExceeded`` when there is none."""
        self._names[tenant_id] = tenant_name
        rate = limits_for(self.settings, tenant_name).requests_per_s
        if rate is None:
            return
        capacity = max(1.0, rate)
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key_prefix, (capacity, now))
            tokens = min(capacity, tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[key_prefix] = (tokens - 1.0, now)
                return
            self._buckets[key_prefix] = (tokens, now)
        wait = (1.0 - tokens) / rate
        raise QuotaExceeded(
            f"more than {rate:g} requests per second with this API key: retry after {math.ceil(wait)} s",
            limit={"name": "requests_per_s", "value": rate},
            retry_after_s=max(1, math.ceil(wait)),
        )
