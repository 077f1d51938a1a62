"""Model uploads that are Hugging Face archives, told apart from the other formats by their bytes."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

from core.errors import InvalidInput
from core.io.hf.archive import ArchiveLimits, archive_kind
from core.io.hf.load import load_hf_archive
from core.io.limits import DEFAULT_LIMITS, LoadLimits
from core.io.model_files import ModelInfo, validate_model_file

__all__ = ["HF_FORMAT", "HFModelInfo", "is_hf_archive", "validate_model_upload"]

HF_FORMAT = "huggingface"


@dataclass(frozen=True)
class HFModelInfo:
    format: str
    num_parameters: int
    arch: str | None
    details: dict


def is_hf_archive(path: str | os.PathLike) -> bool:
    """A ``.tar.gz``, or a zip whose central directory holds a ``config.json`` (at its root or in its one folder):
    never a ``torch.save`` zip, which holds no config.json."""
    kind = archive_kind(path)
    if kind == "tar.gz":
        return True
    if kind != "zip":
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any(n == "config.json" or (n.count("/") == 1 and n.endswith("/config.json")) for n in names)


def validate_model_upload(
    path: str | os.PathLike,
    fmt: str | None = None,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    limits: LoadLimits = DEFAULT_LIMITS,
    archive_limits: ArchiveLimits | None = None,
) -> ModelInfo | HFModelInfo:
    """A Hugging Face archive loaded as a run would (every check, within ``limits``; the archive within
    ``archive_limits``, by default those of ``limits``), else
    :func:`core.io.model_files.validate_model_file`."""
    if fmt == HF_FORMAT or (fmt is None and is_hf_archive(path)):
        if archive_kind(path) is None:
            raise InvalidInput("a huggingface model is uploaded as a .zip or .tar.gz of its folder")
        loaded = load_hf_archive(path, limits, archive_limits)
        return HFModelInfo(
            format=HF_FORMAT,
            num_parameters=loaded.built.num_parameters,
            arch=loaded.built.architecture,
            details=loaded.source.details,
        )
    return validate_model_file(path, fmt, arch, arch_kwargs, limits)  # type: ignore[arg-type]
