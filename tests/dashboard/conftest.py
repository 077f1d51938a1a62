"""Fixtures of the dashboard's browser tests: one real ``arborist serve`` per module (API + embedded worker,
SQLite), the digits model and data files, and Debian's Chromium driven by Playwright (it cannot download a browser
of its own here). The tests skip, saying why, when the chromium binary or the playwright package is absent."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # the end-to-end kit (real processes)

from _e2e_kit import (
    DigitsFiles,
    Proc,
    base_env,
    child_pids,
    create_key,
    free_port,
    make_digits_files,
    wait_for,
)

CHROMIUM = os.environ.get("ARBORIST_TEST_CHROMIUM", "/usr/bin/chromium")


@dataclass
class Serve:
    base: str
    data_dir: Path
    proc: Proc

    def key(self, tenant: str) -> str:
        return create_key(f"sqlite:///{self.data_dir / 'arborist.db'}", tenant)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """``python -m cli.serve`` on a fresh data directory (two job processes at once), killed with its worker
    afterwards."""
    data_dir = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    # streams end every few seconds without `end` (as at the server's limit): the page must reconnect from the
    # last event it saw to follow a job to its end
    env = base_env(sse_poll_interval_s=0.2, sse_max_seconds=3)
    cmd = [sys.executable, "-m", "cli.serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir), "--jobs", "2", "--log-level", "warning"]
    proc = Proc("serve", cmd, env, data_dir / "serve.log").start()
    try:
        wait_for(
            lambda: "Create an API key" in proc.log(50_000), timeout=90, what="serve's banner", on_timeout=proc.describe
        )
        yield Serve(f"http://127.0.0.1:{port}", data_dir, proc)
    finally:
        workers = _children(proc.pid)
        proc.stop(grace=20)
        for pid in workers:  # serve starts its worker in a session of its own
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _children(pid: int) -> list[int]:
    try:
        return child_pids(pid)
    except OSError:
        return []


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> DigitsFiles:
    return make_digits_files(tmp_path_factory.mktemp("digits"), epochs=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: `make install` installs Debian's (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make install)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            yield browser
        finally:
            browser.close()
