"""Processes that die with the process they serve: the embedded worker with ``arborist serve``, a job process with
its embedded worker.

Without this a ``kill -9`` of ``arborist serve`` left its worker (a session of its own, so no terminal signal
reaches it) running with ppid 1, still claiming jobs, and every restart added one more. Two mechanisms, so that
neither a platform nor a race leaves one behind:

* Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, set by the child itself (through ctypes): the kernel kills it when
  the thread that started it ends. The watched process is checked right after, in case it ended before.
* everywhere: a daemon thread that waits for the watched process to end (a pidfd where there is one, else a poll
  once a second) and then kills this process, or its whole process group when it leads one (the embedded worker:
  itself, its fork server and every job process at once).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import signal
import sys
import threading
import time

log = logging.getLogger("arborist.lifeline")

PR_SET_PDEATHSIG = 1
POLL_S = 1.0


def _set_parent_death_signal(sig: int) -> bool:
    """Asks the kernel to send ``sig`` to this process when its parent (thread) ends; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now: the pid was reused, ours is gone
        return False
    return True


def _die() -> None:
    """Kills this process at once, with its process group when it leads one (its own children go too)."""
    me = os.getpid()
    if os.getpgid(0) == me:
        with contextlib.suppress(OSError):
            os.killpg(me, signal.SIGKILL)
    os.kill(me, signal.SIGKILL)


def _wait_for_exit(pid: int) -> None:
    """Returns when process ``pid`` has ended (a pidfd sees the exit itself; the poll also sees this process
    handed to another parent, since an ended parent may stay a zombie until its own parent reaps it)."""
    parent = os.getppid() == pid
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        except OSError:  # an older kernel: poll instead
            pidfd = None
    if pidfd is not None:
        try:
            select.select([pidfd], [], [])  # readable once the process has exited
        finally:
            os.close(pidfd)
        return
    while _alive(pid) and not (parent and os.getppid() != pid):
        time.sleep(POLL_S)


def die_with(pid: int) -> None:
    """Ties this process's life to process ``pid``: when ``pid`` ends, this process (and the process group it leads)
    is killed. Call it first thing in the child; ``pid`` is the process that started it, or one it must not outlive
    (a job process watches its embedded worker, not the fork server between them)."""
    parent = os.getppid()
    _set_parent_death_signal(signal.SIGKILL)  # the parent (a fork server lives only as long as its client)
    if (parent == pid and os.getppid() != pid) or not _alive(pid):  # it ended before the signal was set
        _die()

    def watch() -> None:
        _wait_for_exit(pid)
        log.warning("process %d ended: stopping process %d with it", pid, os.getpid())
        _die()

    threading.Thread(target=watch, name=f"lifeline-{pid}", daemon=True).start()
