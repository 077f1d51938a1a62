"""Where user-named data may come from: local paths under allowed roots, and ``s3://`` under allowed prefixes.

Every location a user names goes through :func:`resolve_uri`, which is the single place that decides
whether the service may read it:

* bare paths and ``file://`` URIs: the real path (symlinks resolved, ``..`` normalised) must lie inside
  one of the allowed local roots, else :class:`Forbidden`;
* ``s3://bucket/key``: only when an allowed root is an ``s3://`` prefix of it (whole path segments);
  s3fs is optional, and its absence is a clear :class:`InvalidInput`;
* any other scheme (``http``, ``ftp``, ``data:``, ...) is :class:`Forbidden` ("unsupported scheme").

:func:`fetch_to_local` copies an allowed file into a local directory, enforcing a byte cap while it
streams (never trusting a declared size alone), under a temporary name that is renamed when complete.
:func:`local_path` gives a local path for an allowed file: where it is, or a fetched copy.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from core.errors import Forbidden, InvalidInput, TooLarge
from core.io.files import atomic_path

__all__ = ["CHUNK_BYTES", "fetch_to_local", "local_path", "resolve_uri"]

CHUNK_BYTES = 1 << 20  # 1 MiB per read while streaming

# RFC 3986 scheme: a letter then letters, digits, "+", "-", ".". Anything matching "<scheme>:" is a URI.
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


def _scheme_of(uri: str) -> str:
    m = _SCHEME_RE.match(uri)
    return m.group(1).lower() if m else ""


def _check_text(uri: object, what: str = "uri") -> str:
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidInput(
            f"{what} must be a non-empty string", errors=[{"loc": [what], "msg": "empty", "type": "value_error"}]
        )
    if "\x00" in uri:
        raise InvalidInput(
            f"{what} contains a NUL byte", errors=[{"loc": [what], "msg": "NUL byte", "type": "value_error"}]
        )
    return uri.strip()


def _local_path_of(uri: str) -> str:
    """The filesystem path a bare path or ``file://`` URI names (not yet resolved)."""
    if _scheme_of(uri) != "file":
        return os.path.expanduser(uri) if uri.startswith("~") else uri
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise Forbidden(f"file URI with a remote host ({parts.netloc!r}) is not allowed: {uri}")
    if parts.query or parts.fragment:
        raise InvalidInput(f"file URI must not carry a query or fragment: {uri}")
    path = unquote(parts.path)
    if "\x00" in path:
        raise InvalidInput("uri contains a NUL byte")
    if not path.startswith("/"):
        raise InvalidInput(f"file URI must hold an absolute path: {uri}")
    return path


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def _split_roots(allowed_roots: list[str] | None) -> tuple[list[str], list[tuple[str, str]]]:
    """(real local roots, [(bucket, key prefix)] for s3 roots)."""
    local: list[str] = []
    s3: list[tuple[str, str]] = []
    for root in allowed_roots or []:
        root = _check_text(root, "allowed_root")
        scheme = _scheme_of(root)
        if scheme in ("", "file"):
            local.append(_real(_local_path_of(root)))
        elif scheme in ("s3", "s3a"):
            bucket, key = _s3_parts(root)
            s3.append((bucket, key))
        else:
            raise InvalidInput(f"unsupported allowed root {root!r}: only local paths, file:// and s3:// are supported")
    return local, s3


def _s3_parts(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    bucket = parts.netloc
    if not bucket or parts.query or parts.fragment:
        raise InvalidInput(f"malformed s3 URI (expected s3://bucket/key): {uri}")
    raw_key = unquote(parts.path).lstrip("/")
    segments = [s for s in raw_key.split("/") if s not in ("", ".")]
    if ".." in segments:
        raise Forbidden(f"'..' is not allowed in an s3 key: {uri}")
    return bucket, "/".join(segments)


def _s3_filesystem() -> fsspec.AbstractFileSystem:
    try:
        import s3fs  # noqa: F401 ((optional dependency))
    except ImportError as e:
        raise InvalidInput(
            "s3:// locations need the optional 's3fs' package, which is not installed on this server"
        ) from e
    return fsspec.filesystem("s3")


def resolve_uri(uri: str, allowed_roots: list[str]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path for ``uri`` if the service may read it, else :class:`Forbidden`.

    Local paths come back fully resolved (absolute, symlinks followed), so a caller opening the returned
    path reads exactly the file that was checked. s3 paths come back as ``bucket/key``.
    """
    uri = _check_text(uri)
    scheme = _scheme_of(uri)
    local_roots, s3_roots = _split_roots(allowed_roots)

    if scheme in ("", "file"):
        real = _real(_local_path_of(uri))
        if not any(_inside(real, root) for root in local_roots):
            raise Forbidden(
                f"{uri} is outside the allowed data locations",
                errors=[{"loc": ["uri"], "msg": "outside the allowed roots", "type": "forbidden"}],
            )
        return LocalFileSystem(), real

    if scheme in ("s3", "s3a"):
        bucket, key = _s3_parts(uri)
        if not key:
            raise InvalidInput(f"s3 URI names a bucket, not an object: {uri}")
        ok = any(bucket == rb and (not rk or key == rk or key.startswith(rk + "/")) for rb, rk in s3_roots)
        if not ok:
            raise Forbidden(
                f"{uri} is outside the allowed data locations",
                errors=[{"loc": ["uri"], "msg": "outside the allowed roots", "type": "forbidden"}],
            )
        return _s3_filesystem(), f"{bucket}/{key}"

    raise Forbidden(
        f"unsupported scheme {scheme!r} in {uri[:200]!r}: only local paths, file:// and s3:// are allowed",
        errors=[{"loc": ["uri"], "msg": f"unsupported scheme {scheme!r}", "type": "forbidden"}],
    )


def _safe_basename(path: str) -> str:
    name = posixpath.basename(path.replace("\\", "/").rstrip("/"))
    name = _SAFE_NAME_RE.sub("_", name).lstrip(".")
    return name[:200] or "download"


def _open_local(path: str, allowed_roots: list[str]) -> tuple[BinaryIO, int]:
    """Open a resolved local path without following a symlink swapped in since it was checked; (file, size)."""
    local_roots, _ = _split_roots(allowed_roots)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise InvalidInput(f"file not found: {path}") from e
    except IsADirectoryError as e:
        raise InvalidInput(f"not a regular file: {path}") from e
    except OSError as e:
        raise InvalidInput(f"cannot open {path}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"not a regular file: {path}")
        proc = f"/proc/self/fd/{fd}"
        if os.path.exists(proc):  # re-check what was actually opened (defends against races)
            opened = os.path.realpath(proc)
            if not any(_inside(opened, root) for root in local_roots):
                raise Forbidden(f"{path} is outside the allowed data locations")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def fetch_to_local(uri: str, allowed_roots: list[str], dest_dir: str | os.PathLike, max_bytes: int) -> Path:
    """Copy the file at ``uri`` (checked by :func:`resolve_uri`) into ``dest_dir``; returns the new path.

    The copy streams in chunks and stops with :class:`TooLarge` as soon as more than ``max_bytes`` have
    been read, whatever size the source declared. It is written under a temporary name in ``dest_dir``
    and renamed only once complete, so a partial file is never visible under the final name.
    """
    if not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError("max_bytes must be a non-negative int")
    fs, path = resolve_uri(uri, allowed_roots)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)

    if isinstance(fs, LocalFileSystem):
        src, declared = _open_local(path, allowed_roots)
    else:
        try:
            info = fs.info(path)
        except FileNotFoundError as e:
            raise InvalidInput(f"file not found: {uri}") from e
        except Exception as e:  # remote errors (permissions, network) surface as a clear input error
            raise InvalidInput(f"cannot read {uri}: {e}") from e
        if info.get("type") not in (None, "file"):
            raise InvalidInput(f"not a regular file: {uri}")
        declared = info.get("size")
        src = None
    if declared is not None and declared > max_bytes:
        if src is not None:
            src.close()
        raise TooLarge(f"{uri} is {declared} bytes, over the limit of {max_bytes} bytes")

    final = dest / _safe_basename(path)
    with atomic_path(final) as tmp:
        if src is None:
            try:
                src = fs.open(path, "rb")
            except Exception as e:
                raise InvalidInput(f"cannot read {uri}: {e}") from e
        total = 0
        with src, open(tmp, "wb") as out:
            while True:
                chunk = src.read(CHUNK_BYTES)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise TooLarge(f"{uri} is larger than the limit of {max_bytes} bytes")
                out.write(chunk)
    return final


@contextmanager
def local_path(uri: str, allowed_roots: list[str], max_bytes: int) -> Iterator[str]:
    """A local path to the file at ``uri`` (checked by :func:`resolve_uri`) for the block.

    A local file is used where it is, once it is known to be a regular file still inside the roots (symlinks not
    followed); a remote one is fetched (:func:`fetch_to_local`, capped at ``max_bytes``) into a temporary
    directory that is removed when the block ends.
    """
    fs, resolved = resolve_uri(uri, allowed_roots)
    if isinstance(fs, LocalFileSystem):
        _open_local(resolved, allowed_roots)[0].close()
        yield resolved
        return
    with tempfile.TemporaryDirectory(prefix="arborist-data-") as tmp:
        yield os.fspath(fetch_to_local(uri, allowed_roots, tmp, max_bytes))
