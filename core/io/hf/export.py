"""The pruned model as a Hugging Face folder, zipped: ``hf_model.zip``.

Same file layout as the upload: the small files (config, tokenizer, sentence-transformers files) copied, the
weights written with safetensors under the same file names and tensor names (the shard index copied when there
was one). ``config.json`` records the sparsity in compressed-tensors' vocabulary, as ``ModelCompressor.update_config``
writes it: ``quantization_config = {"quant_method": "compressed-tensors", "format": "dense", "sparsity_config":
{"format": "dense", "targets", "ignore", "global_sparsity", "sparsity_structure": "unstructured"}}``. The zip is
written under a temporary name and renamed (:func:`core.io.files.atomic_path`).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save as save_bytes
from torch import Tensor

from core.io.files import atomic_path
from core.io.hf.source import HFSource

__all__ = ["sparsity_config", "write_hf_zip"]


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def sparsity_config(state: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict:
    """compressed-tensors' ``SparsityCompressionConfig`` fields for the pruned weights ``masks``."""
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    pruned_modules = {_module_of(n) for n in masks}
    weights = {_module_of(n) for n, t in state.items() if n.endswith(".weight") and t.dim() == 2}
    return {
        "format": "dense",
        "targets": sorted(pruned_modules),
        "ignore": sorted(weights - pruned_modules),
        "global_sparsity": zeros / total if total else 0.0,
        "sparsity_structure": "unstructured",
    }


def _config_bytes(raw: bytes, sparsity: dict, updates: Mapping | None = None) -> bytes:
    config = json.loads(raw.decode("utf-8"))
    if updates is not None:  # a structurally shrunk model: dense, its new sizes in the config
        config.update(updates)
    else:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "dense",
            "sparsity_config": sparsity,
        }
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def write_hf_zip(
    path: str | os.PathLike,
    source: HFSource,
    state: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    *,
    config_updates: Mapping | None = None,
) -> Path:
    """Write ``hf_model.zip`` at ``path`` from the upload's ``source`` and the pruned ``state`` (the model's names);
    ``config_updates``: new config fields of a structurally shrunk model (then ``config.json`` gets them instead of
    a sparsity config)."""
    sparsity = sparsity_config(state, masks)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel, data in sorted(source.files.items()):
            zf.writestr(rel, _config_bytes(data, sparsity, config_updates) if rel == "config.json" else data)
        for shard, names in source.shards.items():
            tensors = {}
            for n in names:
                if n in state:
                    tensors[n] = state[n].detach().to("cpu").contiguous().clone()
                # names the model computes (e.g. position_ids) are kept as the upload had them only if present
            zf.writestr(shard, save_bytes(tensors, metadata={"format": "pt"}), compress_type=zipfile.ZIP_STORED)
        if source.index is not None:
            zf.writestr("model.safetensors.index.json", source.index)
    return Path(path)
