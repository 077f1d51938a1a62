"""``worker.lifeline``: a process tied to another dies when that one does, however it ends (SIGKILL included).

Real processes: a parent killed with SIGKILL takes its child along (the kernel's parent-death signal); a process
watching one that is not its parent (a job process watches its embedded worker across the fork server) dies too
(the watch thread); and a process that leads a process group takes the whole group (the embedded worker: its fork
server and job processes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **kwargs) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, **kwargs)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if _running(p)]


def _read_pids(proc: subprocess.Popen[str], n: int) -> list[int]:
    assert proc.stdout is not None
    return [int(proc.stdout.readline()) for _ in range(n)]


def test_child_dies_when_its_parent_is_sigkilled() -> None:
    # the parent starts a child tied to it, prints the child's pid, and waits
    parent = _python(
        """
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import os, time; from worker.lifeline import die_with; die_with(os.getppid()); print('ok', flush=True); "
            "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ok"
        print(child.pid, flush=True)
        time.sleep(600)
        """,
        stdout=subprocess.PIPE,
    )
    try:
        (child,) = _read_pids(parent, 1)
        assert _running(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone([child]) == [], "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()


def test_watcher_of_a_non_parent_dies_with_it_and_takes_its_group() -> None:
    watched = _python("import time; time.sleep(600)")
    # a group leader (like the embedded worker) watching a process that is not its parent, with a child in its group
    leader = _python(
        f"""
        import subprocess, sys, time
        from worker.lifeline import die_with
        die_with({watched.pid})
        member = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(member.pid, flush=True)
        time.sleep(600)
        """,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        (member,) = _read_pids(leader, 1)
        time.sleep(0.3)
        assert _running(leader.pid) and _running(member)
        watched.send_signal(signal.SIGKILL)
        watched.wait(10)
        assert _wait_gone([leader.pid, member]) == [], "the watcher or its group outlived the watched process"
    finally:
        watched.kill()
        for proc in (leader,):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_tying_to_a_process_already_gone_ends_at_once() -> None:
    gone = _python("pass")
    gone.wait(10)
    late = _python(f"from worker.lifeline import die_with; import time; die_with({gone.pid}); time.sleep(600)")
    try:
        assert late.wait(10) == -signal.SIGKILL
    finally:
        late.kill()
