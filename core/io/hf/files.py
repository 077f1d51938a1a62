"""A Hugging Face model folder checked before anything in it is interpreted: what it holds, and what is refused.

Refused (:class:`UnsafeFormat`, 415): pickle-based weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``),
Python files (remote code), any file that starts like a pickle (a ``tokenizer.json`` that is really a pickle
included), symbolic links, a ``config.json`` or ``tokenizer_config.json`` with ``auto_map`` or
``trust_remote_code``. Invalid (:class:`InvalidInput`, 422): no ``config.json``, a ``model_type`` transformers does
not know, no safetensors weights, a shard index that names a file outside the folder or one that is missing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InvalidInput, UnsafeFormat

__all__ = ["HFFolder", "read_folder"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".py", ".pyc", ".so", ".h5", ".msgpack", ".npy")
_SHARD = re.compile(r"^[A-Za-z0-9._-]+\.safetensors$")
_PICKLE_PROTO = 0x80
_MAX_JSON_BYTES = 64 * 1024**2
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt")


@dataclass
class HFFolder:
    """What a checked model folder holds (paths relative to ``root``)."""

    root: Path
    config: dict
    shards: list[str]
    files: list[str]
    tokenizer: str | None
    pooling: str | None = None
    sentence_transformers: bool = False
    extra: dict = field(default_factory=dict)


def _unsafe(detail: str, name: str) -> UnsafeFormat:
    return UnsafeFormat(detail, errors=[{"loc": ["file", name], "msg": detail, "type": "unsafe_file"}])


def _invalid(detail: str, loc: list) -> InvalidInput:
    return InvalidInput(detail, errors=[{"loc": loc, "msg": detail, "type": "value_error"}])


def read_json(root: Path, name: str) -> dict:
    """A JSON object file of the folder, size-capped; anything else is a 422 naming the file."""
    path = root / name
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise _invalid(f"{name} is over {_MAX_JSON_BYTES:,} bytes", ["file", name])
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # undecodable, not JSON, or an integer of over 4300 digits
        raise _invalid(f"{name} is not valid UTF-8 JSON ({e.__class__.__name__})", ["file", name]) from e
    if not isinstance(value, dict):
        raise _invalid(f"{name} is not a JSON object", ["file", name])
    return value


def _walk(root: Path) -> list[str]:
    """Every file under ``root`` (relative, '/'-separated); links and special files refused."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                raise _unsafe(f"{rel} is a symbolic link: links are refused in a model folder", rel)
            if name in filenames and not full.is_file():
                raise _unsafe(f"{rel} is not a regular file", rel)
        found += [(Path(dirpath) / n).relative_to(root).as_posix() for n in filenames]
    return sorted(found)


def _check_files(root: Path, files: list[str]) -> None:
    for rel in files:
        low = rel.lower()
        if low.endswith(_UNSAFE_SUFFIXES):
            kind = (
                "Python code (remote code is never run)"
                if low.endswith((".py", ".pyc", ".so"))
                else ("pickle-based or non-safetensors weights (unpickling runs code)")
            )
            raise _unsafe(f"{rel}: {kind} are refused; save the weights with safetensors", rel)
        if low.endswith(".safetensors"):
            continue
        with open(root / rel, "rb") as f:
            head = f.read(2)
        if head[:1] == bytes([_PICKLE_PROTO]) or head == b"PK":
            raise _unsafe(f"{rel} is a pickle (or a zip holding one): pickled files are refused", rel)


def _check_remote_code(cfg: dict, name: str) -> None:
    for key in ("auto_map", "trust_remote_code", "custom_pipelines"):
        if key in cfg:
            raise _unsafe(f"{name} has {key!r}: models that need their own code are refused (no remote code)", name)


def _check_model_type(cfg: dict) -> str:
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise _invalid("config.json has no model_type", ["config.json", "model_type"])
    if model_type not in CONFIG_MAPPING:
        raise _invalid(
            f"config.json names model_type {model_type!r}, which transformers does not know",
            ["config.json", "model_type"],
        )
    return model_type


def _shards(root: Path, files: list[str]) -> list[str]:
    if INDEX in files:
        index = read_json(root, INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise _invalid(f"{INDEX} has no weight_map object", ["file", INDEX])
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise _invalid(f"{INDEX}: weight_map values must be file names", ["file", INDEX])
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not _SHARD.match(shard) or shard in (".", "..") or ".." in shard.split("/"):
                raise _unsafe(
                    f"{INDEX} names {shard!r}: a shard must be a .safetensors file in the model folder", INDEX
                )
            if shard not in files:
                raise _invalid(f"{INDEX} names {shard!r}, which the model folder does not hold", ["file", INDEX])
        return shards
    if WEIGHTS in files:
        return [WEIGHTS]
    if any(f.endswith(".bin") for f in files):
        raise _unsafe("the model folder holds only pickle-based weights (pytorch_model.bin): refused", "file")
    raise _invalid(f"the model folder holds no {WEIGHTS} (or {INDEX} with its shards)", ["file"])


def _pooling(root: Path, files: list[str]) -> tuple[bool, str | None]:
    """Whether the folder is a sentence-transformers model, and its pooling mode (``mean``, ``cls``, ``max``)."""
    if "modules.json" not in files:
        return False, None
    path = root / "modules.json"
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise _invalid(f"modules.json is over {_MAX_JSON_BYTES:,} bytes", ["file", "modules.json"])
    try:
        modules = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # undecodable, not JSON, or an integer of over 4300 digits
        raise _invalid("modules.json is not valid JSON", ["file", "modules.json"]) from e
    if not isinstance(modules, list):
        raise _invalid("modules.json is not a list", ["file", "modules.json"])
    mode = None
    for module in modules:
        if not isinstance(module, dict) or not isinstance(module.get("path", ""), str):
            raise _invalid("modules.json entries must be objects", ["file", "modules.json"])
        if str(module.get("type", "")).endswith("Pooling"):
            name = f"{module.get('path') or '.'}/config.json".lstrip("./")
            if name in files:
                pool = read_json(root, name)
                for key, value in (
                    ("pooling_mode_mean_tokens", "mean"),
                    ("pooling_mode_cls_token", "cls"),
                    ("pooling_mode_max_tokens", "max"),
                ):
                    if pool.get(key):
                        mode = value
                        break
    return True, mode or "mean"


def read_folder(root: str | os.PathLike) -> HFFolder:
    """Check the model folder ``root`` (see the module docstring) and say what it holds."""
    root = Path(root)
    if not root.is_dir():
        raise _invalid("the model folder is missing", ["file"])
    files = _walk(root)
    _check_files(root, files)
    if "config.json" not in files:
        raise _invalid("the model folder has no config.json", ["file", "config.json"])
    config = read_json(root, "config.json")
    _check_remote_code(config, "config.json")
    if "tokenizer_config.json" in files:
        _check_remote_code(read_json(root, "tokenizer_config.json"), "tokenizer_config.json")
    _check_model_type(config)
    shards = _shards(root, files)
    tokenizer = next((t for t in _TOKENIZER_FILES if t in files), None)
    st, pooling = _pooling(root, files)
    return HFFolder(
        root=root,
        config=config,
        shards=shards,
        files=files,
        tokenizer=tokenizer,
        pooling=pooling,
        sentence_transformers=st,
    )
