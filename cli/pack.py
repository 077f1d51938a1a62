"""A Hugging Face model folder packed into a zip for upload (httpx and the standard library only)."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["packed"]


def _files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .git, .cache
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink():
                raise ValueError(f"{path} is a symbolic link: copy the file into the folder instead")
            yield path


@contextmanager
def packed(path: str | Path) -> Iterator[Path]:
    """``path`` itself when it is a file; a folder zipped into a temporary file (removed afterwards). The zip holds
    the folder's files at its root; the server checks them all again."""
    path = Path(path)
    if not path.is_dir():
        yield path
        return
    fd, name = tempfile.mkstemp(prefix=f"{path.name}-", suffix=".zip")
    os.close(fd)
    try:
        with zipfile.ZipFile(name, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for file in _files(path):
                rel = file.relative_to(path).as_posix()
                stored = rel.endswith(".safetensors")  # weights hardly compress: store them, faster
                zf.write(file, rel, compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
        yield Path(name)
    finally:
        os.unlink(name)
