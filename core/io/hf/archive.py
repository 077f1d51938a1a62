"""Safe extraction of a Hugging Face model archive (``.zip`` or ``.tar.gz``) into a fresh staging directory.

Every entry is checked before a byte of it is written, and nothing is ever written outside the staging directory:

* names: relative, no ``..`` segment, no backslash, no drive letter, no NUL, at most ``MAX_DEPTH`` folders deep;
* kinds: regular files and folders only (symlinks, hard links, devices, FIFOs refused);
* no nested archives (an entry that is itself a zip, tar or gzip, by name or by its first bytes);
* sizes: at most ``max_files`` entries, their declared sizes summed at most ``max_total_bytes`` *before* anything is
  extracted, a compression ratio guard on large zip entries, and the bytes actually written are counted against the
  declared size of each entry as they stream (a lying header stops the extraction).

On any refusal the staging directory is removed: the caller never sees a half-extracted model.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from core.errors import InvalidInput, TooLarge, UnsafeFormat
from core.io.limits import DEFAULT_LIMITS, LoadLimits, check_limit

__all__ = ["DEFAULT_ARCHIVE_LIMITS", "ArchiveLimits", "archive_kind", "extract_archive", "pack_folder"]

ZIP_MAGIC = b"PK\x03\x04"
GZIP_MAGIC = b"\x1f\x8b"
MAX_DEPTH = 8
_CHUNK = 1 << 20
_RATIO_FLOOR_BYTES = 16 * 1024**2
_MAX_RATIO = 200
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst")
_ARCHIVE_MAGICS = (ZIP_MAGIC, GZIP_MAGIC, b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf", b"Rar!", b"\x28\xb5\x2f\xfd")
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ArchiveLimits:
    """What one model archive may hold once extracted (``None``: no cap); the service fills them from its settings
    (``ARBORIST_MAX_ARCHIVE_FILES``, ``ARBORIST_MAX_ARCHIVE_BYTES``) through :class:`~core.io.limits.LoadLimits`."""

    max_files: int | None = DEFAULT_LIMITS.max_archive_files
    max_total_bytes: int | None = DEFAULT_LIMITS.max_archive_bytes

    @classmethod
    def of(cls, limits: LoadLimits) -> ArchiveLimits:
        return cls(max_files=limits.max_archive_files, max_total_bytes=limits.max_archive_bytes)


#: the limits of an uploaded archive when the caller names none
DEFAULT_ARCHIVE_LIMITS = ArchiveLimits()


def archive_kind(path: str | os.PathLike) -> str | None:
    """``"zip"``, ``"tar.gz"`` or ``None`` from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC:
        return "zip"
    if head[:2] == GZIP_MAGIC:
        return "tar.gz"
    return None


def _refuse(detail: str, name: str, cls: type[InvalidInput] | type[UnsafeFormat] = InvalidInput) -> Exception:
    return cls(detail, errors=[{"loc": ["file", name], "msg": detail, "type": "archive_entry"}])


def _check_name(name: str) -> tuple[str, ...]:
    """The path parts of an archive entry name, or a refusal (zip-slip, absolute paths, odd names)."""
    if "\x00" in name or "\\" in name:
        raise _refuse(f"archive entry {name!r}: NUL bytes and backslashes are refused in names", name, UnsafeFormat)
    if name.startswith("/") or _DRIVE.match(name):
        raise _refuse(f"archive entry {name!r}: absolute paths are refused", name, UnsafeFormat)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise _refuse(f"archive entry {name!r}: '..' would write outside the model folder", name, UnsafeFormat)
    if len(parts) > MAX_DEPTH + 1:
        raise _refuse(f"archive entry {name!r}: more than {MAX_DEPTH} folders deep", name)
    return parts


def _check_not_archive_name(name: str) -> None:
    if name.lower().endswith(_ARCHIVE_SUFFIXES):
        raise _refuse(f"archive entry {name!r}: nested archives are refused", name, UnsafeFormat)


def _check_totals(count: int, total: int, limits: ArchiveLimits) -> None:
    """Entries and declared bytes within ``limits``, else :class:`~core.errors.LimitExceeded` (a 413) naming the
    setting that raises it."""
    check_limit(count, limits.max_files, what="the archive holds", unit="entries", setting="ARBORIST_MAX_ARCHIVE_FILES",
                loc=["file"])  # fmt: skip
    check_limit(total, limits.max_total_bytes, what="the archive declares", unit="bytes once extracted",
                setting="ARBORIST_MAX_ARCHIVE_BYTES", loc=["file"])  # fmt: skip


def _unreadable(name: str, e: BaseException) -> str:
    """Why an entry could not be extracted: twice in the archive, a file where a folder is (or the reverse), or
    damaged data."""
    if isinstance(e, (FileExistsError, NotADirectoryError, IsADirectoryError)):
        return f"archive entry {name!r} appears twice, or clashes with another entry (a file and a folder of one name)"
    return f"archive entry {name!r} cannot be read: {e}"


def _copy(src: BinaryIO, dest: Path, declared: int, name: str) -> None:
    """Stream ``src`` into ``dest`` (a new file), refusing more bytes than ``declared`` or a nested archive."""
    written = 0
    with open(dest, "xb") as out:
        first = True
        while chunk := src.read(_CHUNK):
            if first and chunk.startswith(_ARCHIVE_MAGICS) and not name.endswith(".safetensors"):
                raise _refuse(
                    f"archive entry {name!r} is itself an archive: nested archives are refused", name, UnsafeFormat
                )
            first = False
            written += len(chunk)
            if written > declared:
                raise _refuse(f"archive entry {name!r} holds more bytes than its declared {declared:,}", name, TooLarge)
            out.write(chunk)
    if written != declared:
        raise _refuse(f"archive entry {name!r} holds {written:,} bytes, its header declares {declared:,}", name)


def _target(root: Path, parts: tuple[str, ...]) -> Path:
    target = root.joinpath(*parts)
    if not os.path.realpath(target).startswith(os.path.realpath(root) + os.sep):  # belt and braces
        raise _refuse(
            f"archive entry {'/'.join(parts)!r} resolves outside the model folder", "/".join(parts), UnsafeFormat
        )
    return target


def _extract_zip(path: str | os.PathLike, root: Path, limits: ArchiveLimits) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InvalidInput(f"a damaged zip archive ({e})") from e
    with zf:
        infos = zf.infolist()
        _check_totals(len(infos), sum(i.file_size for i in infos), limits)
        plan: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
        for info in infos:
            parts = _check_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _refuse(
                    f"archive entry {info.filename!r} is a symbolic link: links are refused",
                    info.filename,
                    UnsafeFormat,
                )
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no Unix type recorded (a plain file)
                raise _refuse(f"archive entry {info.filename!r} is not a regular file", info.filename, UnsafeFormat)
            if info.flag_bits & 0x1:
                raise _refuse(f"archive entry {info.filename!r} is encrypted", info.filename)
            if not info.is_dir():
                _check_not_archive_name(info.filename)
                if info.file_size > _RATIO_FLOOR_BYTES and info.file_size > _MAX_RATIO * max(info.compress_size, 1):
                    raise _refuse(
                        f"archive entry {info.filename!r} expands {info.file_size / max(info.compress_size, 1):,.0f}"
                        f" times: refused as a zip bomb",
                        info.filename,
                        TooLarge,
                    )
            if parts:
                plan.append((info, parts))
        for info, parts in plan:
            target = _target(root, parts)
            try:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src:
                    _copy(src, target, info.file_size, info.filename)
            except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, OSError, zlib.error) as e:
                raise _refuse(_unreadable(info.filename, e), info.filename) from e


def _extract_tar(path: str | os.PathLike, root: Path, limits: ArchiveLimits) -> None:
    try:
        tf = tarfile.open(path, mode="r:gz")  # noqa: SIM115 (closed by the with below, once opening is known to work)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InvalidInput(f"a damaged .tar.gz archive ({e})") from e
    with tf:
        members: list[tarfile.TarInfo] = []
        total = 0
        try:
            for member in tf:  # headers only; each data block is skipped, never decompressed into memory
                if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                    # refused before the next header: skipping an unknown member's data decompresses it
                    raise _refuse(f"archive entry {member.name!r} is not a regular file", member.name, UnsafeFormat)
                members.append(member)
                total += member.size if member.isreg() else 0
                _check_totals(len(members), total, limits)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise InvalidInput(f"a damaged .tar.gz archive ({e})") from e
        for member in members:
            parts = _check_name(member.name)
            if member.issym() or member.islnk():
                raise _refuse(f"archive entry {member.name!r} is a link: links are refused", member.name, UnsafeFormat)
            if not (member.isreg() or member.isdir()):
                raise _refuse(f"archive entry {member.name!r} is not a regular file", member.name, UnsafeFormat)
            if member.isreg():
                _check_not_archive_name(member.name)
        for member in members:
            parts = _check_name(member.name)
            if not parts:
                continue
            target = _target(root, parts)
            try:
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                assert src is not None
                with src:
                    _copy(src, target, member.size, member.name)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise _refuse(_unreadable(member.name, e), member.name) from e


def _single_folder(root: Path) -> Path:
    """The model folder: ``root``, or its only sub-folder when the archive wrapped the model in one."""
    entries = list(root.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not (root / "config.json").exists():
        return entries[0]
    return root


def extract_archive(
    path: str | os.PathLike, parent: str | os.PathLike | None = None, limits: ArchiveLimits = DEFAULT_ARCHIVE_LIMITS
) -> tuple[Path, Path]:
    """Extract the archive at ``path`` into a new directory under ``parent`` (the system's temporary folder by
    default); returns ``(staging, model_folder)``: the caller removes ``staging`` when done. Refusals raise
    :class:`InvalidInput`, :class:`UnsafeFormat` or :class:`TooLarge` and leave nothing behind."""
    kind = archive_kind(path)
    if kind is None:
        raise InvalidInput("not a model archive: expected a .zip or .tar.gz of a Hugging Face model folder")
    staging = Path(tempfile.mkdtemp(prefix="arborist-hf-", dir=parent))
    try:
        (_extract_zip if kind == "zip" else _extract_tar)(path, staging, limits)
        return staging, _single_folder(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def pack_folder(
    root: str | os.PathLike, dest: str | os.PathLike, limits: ArchiveLimits = DEFAULT_ARCHIVE_LIMITS
) -> Path:
    """Zip the model folder ``root`` (a registered location) into ``dest``: regular files only (a symbolic link,
    which could point anywhere, is refused), within ``limits``. The zip is then checked like any upload."""
    root = Path(root)
    files: list[Path] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                raise _refuse(f"{rel} is a symbolic link: links are refused in a model folder", rel, UnsafeFormat)
            if name in filenames:
                if not path.is_file():
                    raise _refuse(f"{rel} is not a regular file", rel, UnsafeFormat)
                files.append(path)
                total += path.stat().st_size
        _check_totals(len(files), total, limits)
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(files):
            zf.write(path, path.relative_to(root).as_posix())
    return Path(dest)
