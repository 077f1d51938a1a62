"""Where a run's time and memory go: wall time per phase, and the process's peak memory next to the plan's.

``PhaseTimer`` is a context manager factory, ``with timer("gradients"):``, that accumulates wall seconds per phase
name. Phases nest and each second is counted once, in the innermost phase open at the time: the engine's
sub-phases (``core.engine.phases``: gradients, gram, inverse, obs) take their share out of the pruner's "curvature",
so the numbers add up to the time spent. On a GPU each phase ends with a synchronisation, so queued kernels are
counted where they were launched.

Peak memory is the address space's high-water mark (``VmHWM`` in ``/proc/self/status``), reset when the run starts
(``/proc/self/clear_refs``) so that it is this job's and not the forking parent's; ``ru_maxrss`` is not used, as a
forked child inherits its parent's from before ``exec``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

PHASES = (
    "load",
    "evaluation",
    "lambda_sweep",
    "recompute_sweep",
    "curvature",
    "gradients",
    "gram",
    "inverse",
    "obs",
    "finetune",
    "latency",
)


class PhaseTimer:
    """Wall seconds per phase name, exclusive of nested phases (see the module's docstring)."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds: dict[str, float] = dict(seconds or {})
        self._open: list[list] = []  # [name, time the phase last resumed]

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._open:  # pause the enclosing phase
            self._add(self._open[-1][0], now - self._open[-1][1])
        self._open.append([name, now])
        try:
            yield
        finally:
            _synchronize()
            now = time.perf_counter()
            own, started = self._open.pop()
            self._add(own, now - started)
            if self._open:
                self._open[-1][1] = now

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def merge(self, seconds: dict[str, float]) -> None:
        """Add the seconds of an earlier attempt (a resumed run)."""
        for name, value in seconds.items():
            self._add(name, float(value))

    def report(self) -> dict:
        return {
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
            "total": round(sum(self.seconds.values()), 6),
        }


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _status(key: str) -> int | None:
    """A ``/proc/self/status`` size in bytes (None where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """The process's peak resident memory from ``start()`` on (and the GPU's, when one is used), and the most any
    :meth:`section` (a pruning step: what the memory plan predicts) held above the memory it began with."""

    def __init__(self) -> None:
        self.reset = False
        self.start_bytes: int | None = None
        self.carried = 0  # the high-water mark before a section reset it
        self.section_extra: int | None = None

    @staticmethod
    def _clear() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux ≥ 4.0)
            return True
        except OSError:
            return False

    def start(self) -> None:
        self.reset = self._clear()
        self.start_bytes = _status("VmRSS")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    @contextmanager
    def section(self) -> Iterator[None]:
        """Measure the block's own peak over the resident memory it starts with (the run's peak is kept: the mark
        reached before the block is carried over the reset)."""
        self.carried = max(self.carried, _status("VmHWM") or 0)
        if not self._clear():
            yield
            return
        base = _status("VmRSS")
        try:
            yield
        finally:
            hwm = _status("VmHWM")
            if hwm is not None and base is not None:
                self.carried = max(self.carried, hwm)
                self.section_extra = max(self.section_extra or 0, hwm - base)

    def report(self, planned_bytes: int | None) -> dict:
        """Peak and start resident bytes, the peak over the start, the pruning steps' own peak over what the process
        held when each began (what the plan predicts: a step's memory on top of the loaded model and data) and the
        plan's number."""
        peak = max(_status("VmHWM") or 0, self.carried) or None
        step = self.section_extra
        out = {
            "peak_rss_bytes": peak,
            "start_rss_bytes": self.start_bytes,
            "peak_extra_bytes": peak - self.start_bytes if peak is not None and self.start_bytes is not None else None,
            "step_peak_extra_bytes": step,
            "planned_bytes": planned_bytes,
            "step_within_plan": step <= planned_bytes if step is not None and planned_bytes else None,
            "peak_since_start": self.reset,  # False: VmHWM could not be reset; it covers the whole process
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        return out
