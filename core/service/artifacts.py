"""Artifact store over fsspec: a local directory by default, any fsspec URL otherwise (``s3://bucket/prefix``
for S3-compatible object storage, shared by API and workers on any number of hosts).

Keys are relative, '/'-separated paths (``models/<tenant>/<id>.safetensors``). Writes go to a temporary name
and are renamed into place when complete (on object storage: a server-side copy of the completed temporary
object), so a reader never sees a partial file; a write that overflows its byte cap is aborted and its temporary
file deleted (an unfinished multipart upload is aborted, never completed). Memory stays flat: data moves in
chunks (on S3, at most one multipart part of ``S3_BLOCK_BYTES`` is buffered per open file).

On object storage nothing is cached between calls: directory listings are not kept (another host may have
written since), so ``exists`` and reads always ask the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from core.errors import TooLarge

CHUNK = 1024 * 1024
#: the part size of S3 multipart uploads and the read-ahead of S3 reads: what one open object buffers
S3_BLOCK_BYTES = 8 * 1024 * 1024
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,255}")
#: where uploads wait while they are validated (``staging/<tenant>/<uuid><suffix>``), moved away when registered
STAGING = "staging"
#: the file names of unfinished writes: a ``StreamWriter``'s ``<name>.tmp-<32 hex>`` and ``core.io.files``'
#: ``.<name>.<8 random characters>.tmp``
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}$|^\..+\.[a-z0-9_]{8}\.tmp$")


@dataclass(frozen=True)
class Swept:
    """What a sweep deleted: the keys and their total size."""

    keys: list[str]
    bytes: int


def validate_key(key: str) -> str:
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") or not _SEGMENT.fullmatch(p) for p in parts):
        raise ValueError(f"invalid artifact key {key!r}")
    return key


#: the media type of a job's output by its extension: what a download is sent as, and what the API documents
ARTIFACT_MEDIA_TYPES = {
    ".safetensors": "application/octet-stream",
    ".onnx": "application/onnx",
    ".json": "application/json",
    ".csv": "text/csv",
    ".png": "image/png",
    ".zip": "application/zip",
}
DEFAULT_MEDIA_TYPE = "application/octet-stream"


def artifact_media_type(name: str) -> str:
    """The media type a job's output named ``name`` is stored and downloaded as."""
    return ARTIFACT_MEDIA_TYPES.get(os.path.splitext(name)[1], DEFAULT_MEDIA_TYPE)


def artifact_key(job_id: str, name: str) -> str:
    """Where the worker stores a job's output ``name``."""
    return validate_key(f"jobs/{job_id}/{name}")


class StreamWriter:
    """An incremental ``put``: ``write`` chunks, then ``commit`` (rename into place) or ``abort``.

    Counts and hashes as it goes; raises ``TooLarge`` (after deleting the temporary file) when the total
    would exceed ``max_bytes``.
    """

    def __init__(self, store: ArtifactStore, key: str, max_bytes: int | None):
        self.store = store
        self.key = validate_key(key)
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        self._tmp = f"{key}.tmp-{uuid.uuid4().hex}"
        self._fh: IO[bytes] | None = store.fs.open(store._path(self._tmp), "wb")
        self.closed = False

    def write(self, chunk: bytes) -> None:
        if self.closed:
            raise ValueError("writer is closed")
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            self.abort()
            raise TooLarge(f"Upload exceeds the limit of {self.max_bytes} bytes")
        self._hash.update(chunk)
        assert self._fh is not None
        self._fh.write(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def commit(self) -> tuple[int, str]:
        """Closes the temporary file and renames it into place. If either fails (a full disk often shows only
        when the last buffered bytes are flushed, at close), the temporary file is deleted and the error
        raised: nothing is left under the key or beside it."""
        if self.closed:
            raise ValueError("writer is closed")
        assert self._fh is not None
        try:
            self._fh.close()
            self._fh = None
            self.store.fs.mv(self.store._path(self._tmp), self.store._path(self.key))
        except BaseException:
            self.abort()
            raise
        self.closed = True
        return self.size, self.sha256

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):  # closing may fail again (ENOSPC on the final flush)
            if self._fh is not None:
                _discard(self._fh)
        self._fh = None
        with contextlib.suppress(FileNotFoundError):
            self.store.fs.rm(self.store._path(self._tmp))


def _discard(fh: IO[bytes]) -> None:
    """Ends an unfinished write without completing it: an object store's buffered file (S3) aborts its multipart
    upload, so no partial object is ever created; a local file is closed (its temporary name is deleted next)."""
    discard = getattr(fh, "discard", None)
    if discard is not None and not isinstance(getattr(fh, "fs", None), LocalFileSystem) and hasattr(fh, "buffer"):
        discard()
        fh.closed = True  # type: ignore[misc]  # fsspec's buffered file: never flush what was discarded
        return
    fh.close()


def _object_store_options(root: str, options: dict[str, Any]) -> dict[str, Any]:
    """Defaults for object storage: no listings cache (other hosts write too) and bounded buffers."""
    protocol = root.split("://", 1)[0] if "://" in root else "file"
    if protocol in ("s3", "s3a"):
        options.setdefault("use_listings_cache", False)
        options.setdefault("default_block_size", S3_BLOCK_BYTES)
    return options


class ArtifactStore:
    def __init__(self, root: str, **storage_options: Any):
        self.url = root
        self.fs, path = fsspec.core.url_to_fs(root, **_object_store_options(root, storage_options))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            path = str(Path(path).expanduser().resolve())
            Path(path).mkdir(parents=True, exist_ok=True)
        self.root = path.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def _ensure_parent(self, key: str) -> None:
        if not self.is_local:
            return  # object stores have no directories: a key's "parents" exist with it
        parent = self._path(key).rsplit("/", 1)[0]
        with contextlib.suppress(FileExistsError):
            self.fs.makedirs(parent, exist_ok=True)

    # --- writing ---------------------------------------------------------------------------------------

    def writer(self, key: str, *, max_bytes: int | None = None) -> StreamWriter:
        self._ensure_parent(validate_key(key))
        return StreamWriter(self, key, max_bytes)

    def put_stream(self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None) -> tuple[int, str]:
        """Writes ``chunks`` under ``key``; returns ``(size, sha256)``. ``TooLarge`` (nothing left) on overflow."""
        w = self.writer(key, max_bytes=max_bytes)
        try:
            for chunk in chunks:
                if chunk:
                    w.write(chunk)
        except BaseException:
            w.abort()
            raise
        return w.commit()

    def put_file(self, key: str, src: str | os.PathLike[str], max_bytes: int | None = None) -> tuple[int, str]:
        def chunks() -> Iterator[bytes]:
            with open(src, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        return self.put_stream(key, chunks(), max_bytes=max_bytes)

    def move(self, src: str, dst: str) -> None:
        self._ensure_parent(validate_key(dst))
        self.fs.mv(self._path(validate_key(src)), self._path(dst))

    # --- reading ---------------------------------------------------------------------------------------

    def open(self, key: str) -> IO[bytes]:
        return self.fs.open(self._path(validate_key(key)), "rb")

    def get_file(self, key: str, dst: str | os.PathLike[str]) -> None:
        """Copies the stored ``key`` to the local file ``dst``."""
        with self.open(key) as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        with self.open(key) as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def local_path(self, key: str) -> Path | None:
        """The file's local path when the store is a local directory, else ``None``."""
        return Path(self._path(validate_key(key))) if self.is_local else None

    @contextlib.contextmanager
    def materialize(self, key: str) -> Iterator[Path]:
        """A local path for ``key``: the file itself when local, else a temporary copy removed afterwards."""
        local = self.local_path(key)
        if local is not None:
            yield local
            return
        suffix = "".join(Path(key).suffixes[-1:])
        with tempfile.TemporaryDirectory(prefix="arborist-") as tmp:
            dst = Path(tmp) / f"artifact{suffix}"
            self.get_file(key, dst)
            yield dst

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(validate_key(key))))

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(validate_key(key))))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(validate_key(key)))

    def delete_tree(self, prefix: str) -> None:
        """Deletes every key under ``prefix/`` (nothing there is fine)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(validate_key(prefix)), recursive=True)

    # --- housekeeping ----------------------------------------------------------------------------------

    def _files(self) -> Iterator[tuple[str, int, float | None]]:
        """Every stored file: its key, size and last modification (a POSIX time; ``None`` when unknown)."""
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return
        for path, info in found.items():
            if info.get("type", "file") != "file" or not path.startswith(self.root + "/"):
                continue
            yield path[len(self.root) + 1 :], int(info.get("size") or 0), _mtime(info)

    def sweep(
        self,
        older_than_s: float,
        *,
        orphaned: Callable[[list[str]], Iterable[str]] | None = None,
        now: float | None = None,
    ) -> Swept:
        """Deletes the files no write will finish or claim, once unmodified for ``older_than_s``: everything under
        ``staging/`` (an upload whose registration never ended), the temporary files of interrupted writes anywhere,
        and those of the other old keys that ``orphaned`` says nothing refers to. A file of unknown age is kept."""
        now = time.time() if now is None else now
        old = {key: size for key, size, mtime in self._files() if mtime is not None and now - mtime > older_than_s}
        doomed = [k for k in old if k.startswith(f"{STAGING}/") or _TEMPORARY.search(k.rsplit("/", 1)[-1])]
        if orphaned is not None:
            rest = old.keys() - set(doomed)
            doomed += sorted(rest & set(orphaned(sorted(rest))))
        deleted = []
        for key in doomed:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._path(key))
                deleted.append(key)
        return Swept(deleted, sum(old[k] for k in deleted))

    def sha256(self, key: str) -> str:
        h = hashlib.sha256()
        for chunk in self.iter_chunks(key):
            h.update(chunk)
        return h.hexdigest()


def _mtime(info: dict[str, Any]) -> float | None:
    """A file's last modification from an fsspec ``info`` dict (local ``mtime``; ``LastModified`` on S3)."""
    for name in ("mtime", "LastModified", "last_modified"):
        value = info.get(name)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
    return None
