"""Prometheus metrics: request counts and latency by route template, and (to a tenant's key) its jobs by state.

Each app gets its own registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("arborist.api")


def tenant_jobs_registry(counts: dict[str, int]) -> CollectorRegistry:
    """A registry holding one tenant's ``arborist_jobs`` gauge (jobs by state), for an authenticated scrape."""
    registry = CollectorRegistry(auto_describe=False)
    family = GaugeMetricFamily("arborist_jobs", "Jobs by state (the calling tenant's)", labels=["state"])
    for state, n in counts.items():
        family.add_metric([state], n)

    class _Once(Collector):
        def collect(self) -> Iterator[Metric]:
            yield family

    registry.register(_Once())
    return registry


class Metrics:
    def __init__(self, factory: sessionmaker[Session] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "arborist_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "arborist_http_request_duration_seconds",
            "Time to the response headers",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def _send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = scope.get("route")
                label = getattr(route, "path", None) or "unmatched"
                self.metrics.latency.labels(scope["method"], label).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], label, str(status)).inc()
