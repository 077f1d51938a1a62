"""``python -m worker.gpus``: one real Celery worker process per GPU, pinned with CUDA_VISIBLE_DEVICES.

No GPU is needed to check the wiring: the supervisor is told the device indices, and each child is a real
``celery worker`` on the real Redis that only has to start. The supervisor itself must never load torch (so
CUDA is never initialised before a fork), a child that dies is started again, and SIGTERM stops them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.service.db import migrate

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_one_pinned_worker_per_gpu(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate.upgrade(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARBORIST_", "CUDA_"))}
    env.update(
        ARBORIST_DATABASE_URL=url,
        ARBORIST_BROKER_URL="redis://127.0.0.1:6379/12",
        ARBORIST_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
        ARBORIST_GPU_RESTART_DELAY_S="0.5",
        PYTHONPATH=str(ROOT),
    )
    log = open(tmp_path / "gpus.log", "wb")
    sup = subprocess.Popen(
        [sys.executable, "-m", "worker.gpus", "--gpus", "0,1", "-Q", "gpu", "--hostname", "t", "--", "-l", "INFO"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        kids = _wait(lambda: len(_children(sup.pid)) == 2 and _children(sup.pid), 30, "two workers")
        pinned = {_environ(pid)["CUDA_VISIBLE_DEVICES"]: _cmdline(pid) for pid in kids}
        assert set(pinned) == {"0", "1"}
        for gpu, cmd in pinned.items():
            assert cmd[cmd.index("-n") + 1] == f"gpu{gpu}@t" and cmd[cmd.index("-c") + 1] == "1"
            assert cmd[cmd.index("-Q") + 1] == "gpu" and "INFO" in cmd
        text = (tmp_path / "gpus.log").read_text
        _wait(lambda: text().count(" ready.") >= 2, 90, "both celery workers to be ready")
        assert "libtorch" not in Path(f"/proc/{sup.pid}/maps").read_text()  # CUDA untouched in the parent

        victim = next(pid for pid in kids if _environ(pid)["CUDA_VISIBLE_DEVICES"] == "1")
        os.kill(victim, signal.SIGKILL)
        new = _wait(lambda: [p for p in _children(sup.pid) if p not in kids], 30, "the restarted worker")
        assert _environ(new[0])["CUDA_VISIBLE_DEVICES"] == "1"

        running = _children(sup.pid)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0  # Celery's warm shutdown in every child, passed on by the supervisor
        assert not [pid for pid in running if Path(f"/proc/{pid}").exists()]
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
            sup.wait(10)
        try:
            os.killpg(sup.pid, signal.SIGKILL)  # any child left behind
        except ProcessLookupError:
            pass
        log.close()
