"""Hugging Face transformers models in and out: safe archive extraction, folder checks, building from config.json
with safetensors weights, the tokenizer, the one-tensor adapter the engine runs, and the ``hf_model.zip`` export."""

from core.io.hf.adapter import HFAdapter
from core.io.hf.archive import ArchiveLimits, archive_kind, extract_archive
from core.io.hf.load import LoadedHF, load_hf_archive, load_hf_folder
from core.io.hf.source import HFSource

__all__ = [
    "ArchiveLimits",
    "HFAdapter",
    "HFSource",
    "LoadedHF",
    "archive_kind",
    "extract_archive",
    "load_hf_archive",
    "load_hf_folder",
]
