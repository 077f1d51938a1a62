"""The app factory. ``uvicorn api.main:app`` (built lazily from Settings) or ``create_app(settings, queue)``."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from api.admission import Gate
from api.dashboard import install_dashboard
from api.housekeeping import start_sweeps
from api.lifecycle import watch_shutdown_signals
from api.observability import Metrics, MetricsMiddleware
from api.problems import install_problem_handlers, install_problem_openapi
from api.ratelimit import RateLimiter
from api.routers import datasets, jobs, models, outputs, plans, system, usage
from api.routing import CloseUnreadBodyMiddleware
from core.runs import preflight
from core.service.artifacts import ArtifactStore
from core.service.db.base import make_engine, make_read_engine, make_sessionmaker
from core.service.queue import JobQueue, make_queue
from core.service.settings import Settings, get_settings

try:
    __version__ = version("arborist")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0"


def create_app(settings: Settings | None = None, queue: JobQueue | None = None) -> FastAPI:
    """The API over ``settings`` (default: environment) and ``queue`` (default: ``make_queue(settings)``)."""
    settings = settings or get_settings()
    if queue is None:
        queue = make_queue(settings)
    pools = {"max_overflow": settings.db_max_overflow, "pool_timeout": settings.db_wait_timeout_s}
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size, **pools)
    factory = make_sessionmaker(engine)
    read_engine = make_read_engine(engine, pool_size=settings.db_read_pool_size, **pools)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            from core.service.db import migrate

            await run_in_threadpool(migrate.upgrade, settings.database_url)
        await run_in_threadpool(preflight.warm_up)  # before gc.freeze: what it imports is frozen too
        unwatch = watch_shutdown_signals(app)  # open event streams end when the server is told to stop
        stop_sweeps = start_sweeps(app)  # what killed processes left in the artifact store (api.housekeeping)
        # Everything imported so far (torch included: ~230k objects) lives as long as the process; moved out of the
        # collector's reach, a full collection no longer stalls every request for ~120 ms (seen as the p99 of
        # status polls under load, bench/load.py).
        gc.freeze()
        try:
            yield
        finally:
            stop_sweeps()
            unwatch()
            engine.dispose()
            read_engine.dispose()

    app = FastAPI(
        title=settings.api_title,
        version=__version__,
        description="Pruning as a service (WoodFisher). Upload a model and data, post a pruning spec, poll the "
        "job, download the artifacts. Errors are RFC 9457 problems (application/problem+json).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.shutting_down = False
    app.state.engine = engine
    app.state.sessionmaker = factory
    app.state.read_engine = read_engine
    # Admission (api.admission): requests wait on the event loop for a slot of their pool's size, never in a
    # thread for a connection. Each pool keeps its overflow for what is not gated (an upload's insert, /metrics).
    app.state.db_gate = Gate("database", settings.db_pool_size, settings.db_wait_timeout_s)
    app.state.read_gate = Gate("status read", settings.db_read_pool_size, settings.db_wait_timeout_s)
    # Event streams poll the database through db_gate too, and no more than a quarter of its slots at once: however
    # many streams are open, the requests keep the rest (a stream that finds no slot polls at its next turn).
    app.state.stream_gate = Gate("event stream poll", max(1, settings.db_pool_size // 4), settings.db_wait_timeout_s)
    app.state.store = ArtifactStore(settings.artifact_root)
    app.state.queue = queue
    app.state.metrics = Metrics(factory)
    app.state.rate_limiter = RateLimiter(settings)

    for module in (system, models, datasets, plans, jobs, outputs, usage):
        app.include_router(module.router)
    install_dashboard(app)  # the web page at /ui/ (api.dashboard)
    install_problem_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(CloseUnreadBodyMiddleware)
    install_problem_openapi(app)
    return app


def __getattr__(name: str) -> Any:
    """``api.main.app`` is built on first access, so importing this module has no side effects."""
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)
