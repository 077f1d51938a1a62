"""Safe model loading: safetensors (weights + a zoo architecture) and ONNX; nothing that executes code.

Formats are told apart by content, never by file extension. Pickle-based files (``torch.save``
checkpoints), TorchScript archives and ``torch.export`` ``.pt2`` archives are refused with
:class:`UnsafeFormat` *before* anything in them is interpreted: this module never unpickles.

A safetensors header is parsed and checked on its own first (sizes, offsets, overlaps), so a file
claiming terabyte tensors is refused without allocating anything. The architecture it names is built on
the ``meta`` device first: its parameters are counted (:class:`~core.io.limits.LoadLimits`) and its
shapes compared with the header before the model is built at full size. ONNX graphs are bounded by the
importer (:mod:`core.io.onnx.bounds`). NaN/Inf weights are refused in both formats, as the same problem.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.errors import ArboristError, InvalidInput, UnsafeFormat, out_of_memory_error
from core.io.files import atomic_path
from core.io.limits import DEFAULT_LIMITS, UNLIMITED, LoadLimits, check_limit
from core.io.onnx import onnx_to_torch
from core.io.renames import expected_names, match_by_order
from core.io.zoo import build_model

__all__ = [
    "SAFETENSORS_DTYPES",
    "ModelFormat",
    "ModelInfo",
    "build_architecture",
    "check_shapes_match",
    "check_state_dict_matches",
    "detect_format",
    "load_model",
    "load_state_dict",
    "read_safetensors_header",
    "refuse_non_finite",
    "save_state_dict",
    "validate_model_file",
]

ModelFormat = Literal["safetensors", "onnx"]

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype tag -> bytes per element (the byte-addressable dtypes torch can hold).
SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

_PICKLE_PROTO = 0x80  # pickle protocol ≥ 2 starts with PROTO (0x80)
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_MAX_ERRORS_IN_DETAIL = 10


@dataclass(frozen=True)
class ModelInfo:
    format: ModelFormat
    num_parameters: int
    arch: str | None
    #: {name in the file: the architecture's name} for a zoo architecture saved under an nn.Sequential's own names
    tensor_names: dict[str, str] | None = None


def _err(loc: list, msg: str, typ: str) -> dict:
    return {"loc": loc, "msg": msg, "type": typ}


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_ERRORS_IN_DETAIL])
    more = len(items) - _MAX_ERRORS_IN_DETAIL
    return shown + (f" (and {more} more)" if more > 0 else "")


def _file_size(path: str | os.PathLike) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise InvalidInput(f"model file not found: {path}") from e
    except OSError as e:
        raise InvalidInput(f"cannot read model file {path}: {e.strerror or e}") from e
    if not os.path.isfile(path):
        raise InvalidInput(f"not a regular file: {path}")
    return st.st_size


def _head(path: str | os.PathLike, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


# --------------------------------------------------------------------------------------------- detection


def _classify_zip(path: str | os.PathLike) -> None:
    """A zip is never a model we accept: say precisely why (always raises)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()  # the central directory only: nothing is decompressed
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InvalidInput(f"unrecognised model file: a damaged zip archive ({e})") from e
    parts = [n.replace("\\", "/").split("/") for n in names]
    base = [p[-1] for p in parts]
    dirs = [set(p[:-1]) for p in parts]
    if any(b == "constants.pkl" for b in base) or any("code" in d for d in dirs):
        raise UnsafeFormat(
            "TorchScript archives are refused: loading one runs code from the file. "
            "Export the weights with safetensors (plus an architecture name) or export to ONNX."
        )
    if any(b == "archive_format" or b.startswith("serialized_exported_program") for b in base) or any(
        "models" in d for d in dirs
    ):
        raise UnsafeFormat(
            "torch.export (.pt2) archives are refused: loading one unpickles data from the file. "
            "Export the weights with safetensors (plus an architecture name) or export to ONNX."
        )
    if any(b.endswith(".pkl") or b.endswith(".pickle") for b in base):
        raise UnsafeFormat(
            "pickle-based PyTorch checkpoints (torch.save, .pt/.pth) are refused: unpickling runs code. "
            "Save the state dict with safetensors.torch.save_file and name the architecture."
        )
    raise InvalidInput("unrecognised model file: a zip archive that is neither safetensors nor ONNX")


def _looks_like_safetensors(path: str | os.PathLike, size: int) -> bool:
    head = _head(path, 9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _parse_onnx(path: str | os.PathLike) -> onnx.ModelProto | None:
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:  # any parse failure means: not an ONNX file; running out of memory does not
        if out_of_memory_error(e) is not None:
            raise
        return None
    if proto.ir_version <= 0 or not proto.HasField("graph") or len(proto.graph.node) == 0:
        return None
    return proto


def detect_format(path: str | os.PathLike) -> ModelFormat:
    """``"safetensors"`` or ``"onnx"``, decided from the bytes of the file.

    Pickles (raw or inside a ``torch.save`` zip), TorchScript and ``torch.export`` archives raise
    :class:`UnsafeFormat`; anything else raises :class:`InvalidInput`.
    """
    size = _file_size(path)
    if size == 0:
        raise InvalidInput("the model file is empty")
    # safetensors first: its 8-byte header length starts with 0x80 (pickle's PROTO) for one file in 256 (ResNet-50's
    # does), and a file read as safetensors is never unpickled whatever its bytes
    if _looks_like_safetensors(path, size):
        return "safetensors"
    head = _head(path, 8)
    if head[0] == _PICKLE_PROTO:
        raise UnsafeFormat(
            "pickle files (torch.save, .pt/.pth) are refused: unpickling runs code. "
            "Save the state dict with safetensors.torch.save_file and name the architecture."
        )
    if head[:4] in _ZIP_MAGICS:
        _classify_zip(path)
    if _parse_onnx(path) is not None:
        return "onnx"
    if _head(path, 9)[8:9] == b"{":  # a safetensors header (length, then JSON) whose length is off: say how
        read_safetensors_header(path)
    raise InvalidInput("unrecognised model file: expected safetensors weights or an ONNX model")


# --------------------------------------------------------------------------------------------- safetensors


def _bad_header(detail: str, loc: list | None = None) -> InvalidInput:
    return InvalidInput(
        f"invalid safetensors file: {detail}",
        errors=[_err(loc or ["file"], detail, "safetensors")],
    )


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _bad_header(f"duplicate key {k!r} in the header")
        out[k] = v
    return out


def read_safetensors_header(path: str | os.PathLike, max_header_bytes: int = MAX_HEADER_BYTES) -> dict:
    """Parse and check the safetensors header only; returns it (``__metadata__`` included if present).

    Checks: the 8-byte little-endian length fits the file and the cap; the header is a JSON object;
    every tensor has a known dtype, a shape of non-negative ints, ``data_offsets`` inside the data
    section whose length is exactly ``prod(shape) * itemsize``; no two tensors overlap.
    Nothing proportional to the claimed tensor sizes is ever allocated.
    """
    size = _file_size(path)
    if size < 8:
        raise _bad_header(f"the file is {size} bytes, too short to hold a header length")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n == 0:
            raise _bad_header("the header length is 0")
        if n > size - 8:
            raise _bad_header(
                f"the header claims {n} bytes but the file has only {size - 8} after the length (truncated?)"
            )
        if n > max_header_bytes:
            raise _bad_header(f"the header is {n} bytes, over the limit of {max_header_bytes}")
        raw = f.read(n)
    if len(raw) != n:
        raise _bad_header("the file is truncated inside the header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except InvalidInput:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise _bad_header(f"the header is not valid UTF-8 JSON ({e.__class__.__name__})") from e
    if not isinstance(header, dict):
        raise _bad_header("the header is not a JSON object")

    data_len = size - 8 - n
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _bad_header("__metadata__ must map strings to strings", ["__metadata__"])

    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        loc = ["tensors", name]
        if not isinstance(entry, dict):
            raise _bad_header(f"tensor {name!r}: entry is not an object", loc)
        extra = set(entry) - {"dtype", "shape", "data_offsets"}
        missing = {"dtype", "shape", "data_offsets"} - set(entry)
        if missing or extra:
            raise _bad_header(
                f"tensor {name!r}: expected dtype, shape and data_offsets "
                f"(missing {sorted(missing)}, unexpected {sorted(extra)})",
                loc,
            )
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise _bad_header(f"tensor {name!r}: unknown dtype {dtype!r}", loc)
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _bad_header(f"tensor {name!r}: shape must be a list of non-negative integers", loc)
        offsets = entry["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise _bad_header(f"tensor {name!r}: data_offsets must be two integers", loc)
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _bad_header(
                f"tensor {name!r}: data_offsets [{begin}, {end}] fall outside the data section of {data_len} bytes",
                loc,
            )
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]  # exact Python ints: no overflow
        if end - begin != nbytes:
            raise _bad_header(
                f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets span {end - begin}",
                loc,
            )
        ranges.append((begin, end, name))

    ranges.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in itertools.pairwise(ranges):
        if b1 < e0:
            raise _bad_header(f"tensors {n0!r} and {n1!r} overlap in the data section", ["tensors", n1])
    return header


def _all_finite(t: Tensor) -> bool:
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.element_size() == 1:  # float8 kinds have no isfinite kernel
        t = t.to(torch.float16)
    return bool(torch.isfinite(t).all())


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a safetensors file, after the header check; NaN/Inf weights are refused."""
    read_safetensors_header(path)
    try:
        tensors = load_file(os.fspath(path), device="cpu")
    except (SafetensorError, ValueError, RuntimeError, TypeError) as e:
        if out_of_memory_error(e) is not None:
            raise
        raise _bad_header(str(e)) from e
    refuse_non_finite(tensors)
    return tensors


def refuse_non_finite(tensors: Mapping[str, Tensor]) -> None:
    """NaN or Inf in any of ``tensors`` (a state dict, whatever the file's format) → ``InvalidInput`` naming them."""
    bad = [name for name, t in tensors.items() if not _all_finite(t)]
    if bad:
        raise InvalidInput(
            f"the weights hold NaN or Inf values in {len(bad)} tensor(s): {_listing(bad)}",
            errors=[_err(["state_dict", name], "NaN or Inf values", "non_finite") for name in bad],
        )


def check_state_dict_matches(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Missing/unexpected keys and shape mismatches between ``model`` and ``state_dict`` → InvalidInput."""
    check_shapes_match(
        {k: tuple(v.shape) for k, v in model.state_dict().items()}, {k: tuple(v.shape) for k, v in state_dict.items()}
    )


def check_shapes_match(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> None:
    """Missing/unexpected names and shape mismatches between the ``expected`` tensor shapes (a model's, possibly
    built on the ``meta`` device) and those ``found`` (in a file, possibly only its header) → InvalidInput."""
    errors: list[dict] = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [k for k in expected if k in found and tuple(expected[k]) != tuple(found[k])]
    errors += [_err(["state_dict", k], "missing from the file", "missing_key") for k in missing]
    errors += [_err(["state_dict", k], "not a tensor of the model", "unexpected_key") for k in unexpected]
    errors += [
        _err(
            ["state_dict", k],
            f"shape {list(found[k])} in the file, model expects {list(expected[k])}",
            "shape_mismatch",
        )
        for k in mismatched
    ]
    if not errors:
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
    if mismatched:
        shown = [f"{k} (file {list(found[k])}, model {list(expected[k])})" for k in mismatched]
        parts.append(f"shape mismatches {len(mismatched)}: {_listing(shown)}")
    raise InvalidInput("the weights do not match the architecture: " + "; ".join(parts), errors=errors)


# --------------------------------------------------------------------------------------------- models


def _build_arch(arch: str | None, arch_kwargs: dict | None) -> nn.Module:
    if not arch:
        raise InvalidInput(
            "safetensors weights need an architecture name (arch) to build the model",
            errors=[_err(["arch"], "required for safetensors weights", "missing")],
        )
    if arch_kwargs is not None and not isinstance(arch_kwargs, dict):
        raise InvalidInput(
            "arch_kwargs must be an object", errors=[_err(["arch_kwargs"], "not an object", "type_error")]
        )
    try:
        return build_model(arch, **(arch_kwargs or {}))
    except ArboristError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise InvalidInput(
            f"cannot build architecture {arch!r} with {arch_kwargs or {}}: {e}",
            errors=[_err(["arch"], str(e), "value_error")],
        ) from e


def build_architecture(arch: str | None, arch_kwargs: dict | None, *, device: str | None = None) -> nn.Module:
    """The zoo architecture a safetensors model names, without its weights. ``device="meta"`` gives shapes
    only (no memory, no initialisation cost): enough to check a model against data before loading either."""
    if device is None:
        return _build_arch(arch, arch_kwargs)
    with torch.device(device):
        return _build_arch(arch, arch_kwargs)


_PARAMETERS_SETTING = "ARBORIST_MAX_MODEL_PARAMETERS"


def _check_parameters(model: nn.Module, what: str, limits: LoadLimits, loc: list[str]) -> None:
    count = sum(p.numel() for p in model.parameters())
    check_limit(count, limits.max_parameters, what=f"{what} has", unit="parameters", setting=_PARAMETERS_SETTING,
                loc=loc)  # fmt: skip


def _load_safetensors(
    path: str | os.PathLike, arch: str | None, arch_kwargs: dict | None, limits: LoadLimits
) -> nn.Module:
    """The architecture's size comes from ``arch_kwargs``, not from the file: so it is built on the ``meta`` device
    first, its parameters counted and its shapes compared with the file's header, before anything is allocated.
    The model built then is the size of the weights in the file."""
    shapes = build_architecture(arch, arch_kwargs, device="meta")
    _check_parameters(shapes, f"architecture {arch!r} with {arch_kwargs or {}}", limits, ["arch_kwargs"])
    header = read_safetensors_header(path)
    expected = {k: tuple(v.shape) for k, v in shapes.state_dict().items()}
    found = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    renames = match_by_order(expected, found) or {}  # an nn.Sequential's own names (core.io.renames)
    try:
        check_shapes_match(expected, {renames.get(k, k): v for k, v in found.items()})
    except InvalidInput as e:
        raise InvalidInput(
            f"{e.detail}. Architecture {arch!r} takes its own names ({expected_names(expected)}), or a plain "
            "nn.Sequential's state dict with the same layers in the same order and shapes (0.weight, 0.bias, "
            "2.weight, …), which is matched by order",
            errors=e.errors,
        ) from None
    state = {renames.get(k, k): v for k, v in load_state_dict(path).items()}
    model = _build_arch(arch, arch_kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied into the parameter
        raise InvalidInput(f"the weights cannot be loaded into {arch!r}: {e}") from e
    model.source_names = {v: k for k, v in renames.items()}  # what a run saves its outputs under (as for ONNX)
    return model


def tensor_renames(path: str | os.PathLike, arch: str | None, arch_kwargs: dict | None) -> dict[str, str] | None:
    """{name in the file: the architecture's name} for a safetensors file saved under an ``nn.Sequential``'s own
    names (:mod:`core.io.renames`), as loading maps them; None when the names are the architecture's (or ONNX)."""
    if not arch or detect_format(path) != "safetensors":
        return None
    expected = {k: tuple(v.shape) for k, v in build_architecture(arch, arch_kwargs, device="meta").state_dict().items()}
    header = read_safetensors_header(path)
    return match_by_order(expected, {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})


def _load_onnx(path: str | os.PathLike, limits: LoadLimits) -> nn.Module:
    try:
        model = onnx_to_torch(os.fspath(path), limits)
    except ArboristError:
        raise
    except Exception as e:  # a malformed graph is a user error, not a server fault
        if out_of_memory_error(e) is not None:
            raise
        raise InvalidInput(f"cannot import the ONNX model: {e}") from e
    _check_parameters(model, "the ONNX model", limits, ["file"])
    refuse_non_finite(model.state_dict())
    return model


def _load(
    path: str | os.PathLike, fmt: ModelFormat | None, arch: str | None, arch_kwargs: dict | None, limits: LoadLimits
) -> tuple[nn.Module, ModelFormat]:
    detected = detect_format(path)
    if fmt is not None and fmt != detected:
        raise InvalidInput(
            f"the file was declared as {fmt!r} but its content is {detected!r}",
            errors=[_err(["format"], f"content is {detected}", "value_error")],
        )
    if detected == "safetensors":
        model = _load_safetensors(path, arch, arch_kwargs, limits)
    else:
        model = _load_onnx(path, limits)
    return model.eval(), detected


def load_model(
    path: str | os.PathLike,
    fmt: ModelFormat | None = None,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    limits: LoadLimits = UNLIMITED,
) -> nn.Module:
    """The model in ``path``, in eval mode. ``fmt`` (if given) must agree with the file's content.

    safetensors: ``core.io.zoo.build_model(arch, **arch_kwargs)`` with the checked weights loaded strictly.
    ONNX: ``core.io.onnx.onnx_to_torch(path)`` (``arch`` is ignored). No size caps unless ``limits`` says so: the
    files a run loads were checked by :func:`validate_model_file` when they were uploaded.
    """
    return _load(path, fmt, arch, arch_kwargs, limits)[0]


def validate_model_file(
    path: str | os.PathLike,
    fmt: ModelFormat | None = None,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    limits: LoadLimits = DEFAULT_LIMITS,
) -> ModelInfo:
    """Load the model as a run would (so every check applies, within ``limits``) and summarise it."""
    model, detected = _load(path, fmt, arch, arch_kwargs, limits)
    return ModelInfo(
        format=detected,
        num_parameters=sum(p.numel() for p in model.parameters()),
        arch=arch if detected == "safetensors" else None,
        tensor_names=tensor_renames(path, arch, arch_kwargs) if detected == "safetensors" else None,
    )


def own_storage(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` on the CPU, contiguous, each with its own storage (safetensors refuses shared storage, e.g. tied
    embeddings): a tensor whose storage an earlier one already holds is cloned."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name!r} is not a tensor")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen and t.numel():
            t = t.clone()
        else:
            seen.add(key)
        out[name] = t
    return out


def save_state_dict(
    tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` as safetensors atomically (:func:`core.io.files.atomic_path`)."""
    out = own_storage(tensors)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=metadata)
    return Path(path)
