"""A Hugging Face model archive (or folder) → a checked, built model with its tokenizer and what rebuilds its folder."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from core.io.hf.archive import ArchiveLimits, extract_archive
from core.io.hf.build import BuiltModel, build_model
from core.io.hf.files import INDEX, HFFolder, read_folder
from core.io.hf.source import HFSource
from core.io.hf.tokenizer import TextTokenizer, load_tokenizer
from core.io.limits import UNLIMITED, LoadLimits
from core.io.model_files import read_safetensors_header

__all__ = ["LoadedHF", "describe", "load_hf_archive", "load_hf_folder"]


@dataclass
class LoadedHF:
    built: BuiltModel
    tokenizer: TextTokenizer | None
    source: HFSource


def describe(folder: HFFolder, built: BuiltModel, tokenizer: TextTokenizer | None) -> dict:
    """What the upload response shows about the model: what was detected."""
    return {
        "model_type": built.model_type,
        "architecture": built.architecture,
        "head": built.head,
        "num_labels": getattr(built.model.config, "num_labels", None)
        if built.head == "sequence_classification"
        else None,
        "tokenizer": folder.tokenizer if tokenizer is not None else None,
        "sentence_transformers": folder.sentence_transformers,
        "pooling": folder.pooling,
        "weight_files": folder.shards,
    }


def load_hf_folder(
    root: str | os.PathLike, limits: LoadLimits = UNLIMITED, *, need_tokenizer: bool = False
) -> LoadedHF:
    folder = read_folder(root)
    built = build_model(folder, limits)
    tokenizer = load_tokenizer(folder) if (need_tokenizer or folder.tokenizer) else None
    small = {
        rel: (folder.root / rel).read_bytes()
        for rel in folder.files
        if not rel.endswith(".safetensors") and rel != INDEX
    }
    shards = {s: [k for k in read_safetensors_header(folder.root / s) if k != "__metadata__"] for s in folder.shards}
    index = (folder.root / INDEX).read_text("utf-8") if INDEX in folder.files else None
    source = HFSource(
        files=small,
        shards=shards,
        index=index,
        model_type=built.model_type,
        head=built.head,
        pooling=folder.pooling,
        details=describe(folder, built, tokenizer),
    )
    return LoadedHF(built=built, tokenizer=tokenizer, source=source)


def load_hf_archive(
    path: str | os.PathLike,
    limits: LoadLimits = UNLIMITED,
    archive_limits: ArchiveLimits | None = None,
    *,
    need_tokenizer: bool = False,
) -> LoadedHF:
    """Extract the archive safely (:mod:`core.io.hf.archive`, within ``archive_limits``, by default those of
    ``limits``) into a staging folder in the temporary directory, load the model from it, remove the folder."""
    staging, root = extract_archive(path, None, archive_limits or ArchiveLimits.of(limits))
    try:
        return load_hf_folder(root, limits, need_tokenizer=need_tokenizer)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
