"""Sweeping the artifact store of what killed processes left: when the API starts, then periodically.

An upload staged but never registered (the server was killed while validating it), the temporary file of a write
cut short (an upload, an artifact, a checkpoint), an input file whose row was never inserted: nothing would ever
delete them. ``ArtifactStore.sweep`` deletes such files once they are older than ``Settings.staging_grace_s``, so
that a file another process is still writing (it keeps its modification time fresh) or validating is left alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import anyio
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from core.service.artifacts import ArtifactStore, Swept
from core.service.db import inputs

log = logging.getLogger("arborist.api")


def sweep_store(store: ArtifactStore, factory: sessionmaker[Session], older_than_s: float) -> Swept:
    """One sweep of ``store``: staged uploads, temporary files and unreferenced input files older than
    ``older_than_s``. Blocking."""

    def orphaned(keys: Sequence[str]) -> set[str]:
        with factory() as session:
            return inputs.unreferenced(session=session, keys=keys)

    swept = store.sweep(older_than_s, orphaned=orphaned)
    if swept.keys:
        log.warning(
            "swept %d unfinished file(s), %d bytes, from the artifact store: %s",
            len(swept.keys),
            swept.bytes,
            ", ".join(swept.keys[:10]) + (" ..." if len(swept.keys) > 10 else ""),
        )
    return swept


def start_sweeps(app: FastAPI) -> Callable[[], None]:
    """Sweeps the app's store now and every ``staging_grace_s`` in the background; returns what stops it. A sweep
    that fails is logged and tried again next time: the API serves regardless."""
    grace = app.state.settings.staging_grace_s

    async def sweeps() -> None:
        while True:
            try:
                await run_in_threadpool(sweep_store, app.state.store, app.state.sessionmaker, grace)
            except Exception:
                log.exception("sweeping the artifact store failed; trying again in %.0f s", grace)
            await anyio.sleep(grace)

    task = asyncio.get_running_loop().create_task(sweeps(), name="artifact-store-sweeps")
    return task.cancel
