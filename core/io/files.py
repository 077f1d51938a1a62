"""Files written whole or not at all: a temporary file beside the target, fsynced and renamed over it.

A reader sees the previous file or the complete new one, never a partial one; a failed write (a full disk
included: see :func:`core.errors.no_space_error`) removes the temporary file and leaves the target as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (its folder is created) for the block to write by name; renamed onto
    ``path`` when the block ends, removed when it raises."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_path`; returns ``path``."""
    with atomic_path(path) as tmp, os.fdopen(os.open(tmp, os.O_WRONLY), "wb") as f:  # the file mkstemp made
        f.write(data)
    return Path(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
