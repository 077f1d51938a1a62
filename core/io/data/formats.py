"""Dataset files by format: .npz, .safetensors and .parquet, recognised by their bytes, not their names.

Nothing here unpickles: ``.npz`` archives are checked entry by entry (only ``.npy`` members, declared array sizes
that match the stored bytes, a cap on uncompressed size, a compression-ratio guard) before
``np.load(..., allow_pickle=False)`` reads them; parquet data is capped by its decoded size as it is read.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections import Counter
from typing import Literal

import numpy as np
import torch
from numpy.lib import format as npy
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from core.errors import ArboristError, InvalidInput, TooLarge, UnsafeFormat
from core.io.data.dataset import Dataset, field_error
from core.io.model_files import read_safetensors_header

DatasetFormat = Literal["npz", "safetensors", "parquet"]

MAX_UNCOMPRESSED_BYTES = 8 * 1024**3  # all arrays of an .npz / all column chunks of a parquet, decoded
_RATIO_FLOOR_BYTES = 16 * 1024**2  # entries smaller than this are not ratio-checked
_MAX_RATIO = 200  # uncompressed / compressed for a large .npz entry: beyond this it is treated as a bomb

_X_KEYS = ("x", "inputs")
_Y_KEYS = ("y", "targets")
_LABEL_COLUMNS = ("label", "target")
_SPLIT_COLUMN = "split"


# --------------------------------------------------------------------------------------------- arrays


def _features(a: np.ndarray, key: str) -> Tensor:
    if a.dtype.hasobject:
        raise UnsafeFormat(f"{key} is an object array (pickled data), which is refused")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.issubdtype(a.dtype, np.complexfloating):
        raise InvalidInput(
            f"{key} must be numeric, got dtype {a.dtype}", errors=[field_error([key], f"dtype {a.dtype}")]
        )
    if a.ndim == 0:
        raise InvalidInput(f"{key} must hold one row per example, got a scalar")
    if a.ndim == 1:
        a = a.reshape(-1, 1)
    return _tensor(a, np.float32)


def _tensor(a: np.ndarray, dtype: type) -> Tensor:
    out = np.ascontiguousarray(a, dtype=dtype)
    if not out.flags.writeable:  # e.g. zero-copy views of Arrow buffers
        out = out.copy()
    return torch.from_numpy(out)


def _labels(a: np.ndarray, key: str) -> Tensor:
    if a.dtype.hasobject:
        raise UnsafeFormat(f"{key} is an object array (pickled data), which is refused")
    if a.ndim == 0:
        raise InvalidInput(f"{key} must hold one label per example, got a scalar")
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        if a.ndim == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if np.issubdtype(a.dtype, np.unsignedinteger) and a.size and int(a.max()) > np.iinfo(np.int64).max:
            raise InvalidInput(f"{key} holds labels too large for int64")
        return _tensor(a, np.int64)
    if np.issubdtype(a.dtype, np.floating):
        return _tensor(a, np.float32)
    raise InvalidInput(
        f"{key} must be numeric labels, got dtype {a.dtype}", errors=[field_error([key], f"dtype {a.dtype}")]
    )


def _named(arrays: dict[str, np.ndarray], prefix: str) -> tuple[Tensor, tuple] | None:
    """Arrays ``{prefix}.<name>`` (a model's named inputs, ``x.input_ids``, ``x.attention_mask``): one float32
    ``(N, D)`` of them flattened per example and concatenated in the file's order, and ((name, shape), ...)."""
    keys = [k for k in arrays if k.startswith(prefix + ".") and len(k) > len(prefix) + 1]
    if not keys:
        return None
    cols, layout = [], []
    for k in keys:
        a = arrays[k]
        t = _features(a, k)
        if a.ndim == 1:
            t = t.reshape(-1)
        if len(t) != len(arrays[keys[0]]):
            raise InvalidInput(f"the named inputs differ in their number of examples ({k!r})")
        if not np.issubdtype(a.dtype, np.floating) and a.size and float(np.abs(a).max()) >= 2**24:
            raise InvalidInput(f"{k} holds integers of 2**24 or more, which float32 cannot carry exactly",
                               errors=[field_error([k], "integers beyond 2**24")])  # fmt: skip
        layout.append((k[len(prefix) + 1 :], tuple(int(d) for d in t.shape[1:])))
        cols.append(t.reshape(len(t), -1))
    return torch.cat(cols, 1), tuple(layout)


def _from_named(arrays: dict[str, np.ndarray], yk: str) -> Dataset:
    train, val = _named(arrays, "x"), _named(arrays, "x_val")
    if (val is None) != ("y_val" not in arrays):
        raise InvalidInput("a validation split needs both 'x_val.<name>' arrays and 'y_val'")
    if val is not None and val[1] != train[1]:
        raise InvalidInput("the 'x_val.<name>' arrays must be the 'x.<name>' ones, in the same order and shapes")
    return Dataset(
        x_train=train[0],
        y_train=_labels(arrays[yk], "y"),
        x_val=val[0] if val is not None else None,
        y_val=_labels(arrays["y_val"], "y_val") if val is not None else None,
        named_inputs=train[1],
    )


def _from_arrays(arrays: dict[str, np.ndarray], source: str) -> Dataset:
    xk = next((k for k in _X_KEYS if k in arrays), None)
    yk_named = next((k for k in _Y_KEYS if k in arrays), None)
    if xk is None and yk_named is not None and any(k.startswith("x.") for k in arrays):
        return _from_named(arrays, yk_named)  # a model's named inputs: x.input_ids, x.attention_mask, …
    yk = next((k for k in _Y_KEYS if k in arrays), None)
    if xk is None or yk is None:
        raise InvalidInput(
            f"the {source} file must hold arrays 'x' and 'y' (or 'inputs' and 'targets', or a model's named inputs "
            f"'x.<name>' and 'y'); found {sorted(arrays)[:20]}",
            errors=[field_error(["file"], "missing x/y arrays", "missing")],
        )
    has_xv, has_yv = "x_val" in arrays, "y_val" in arrays
    if has_xv != has_yv:
        raise InvalidInput("a validation split needs both 'x_val' and 'y_val'")
    return Dataset(
        x_train=_features(arrays[xk], "x"),
        y_train=_labels(arrays[yk], "y"),
        x_val=_features(arrays["x_val"], "x_val") if has_xv else None,
        y_val=_labels(arrays["y_val"], "y_val") if has_yv else None,
    )


# --------------------------------------------------------------------------------------------- detection


def _check_npz(path: str | os.PathLike, max_uncompressed: int = MAX_UNCOMPRESSED_BYTES) -> None:
    """Refuse anything but a plain zip of ``.npy`` arrays of honest sizes (raises, else returns)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise InvalidInput(f"damaged zip archive: {e}") from e
    with zf:
        infos = zf.infolist()
        if not infos:
            raise InvalidInput("the dataset is empty: the archive holds no arrays")
        names: set[str] = set()
        total = 0
        for info in infos:
            name = info.filename
            if info.is_dir() or not name.endswith(".npy") or "/" in name or "\\" in name:
                raise InvalidInput(
                    f"an .npz must hold only .npy arrays; refusing member {name[:200]!r}",
                    errors=[field_error(["file", name[:200]], "not an .npy array", "unexpected_member")],
                )
            if name in names:
                raise InvalidInput(f"duplicate member {name!r} in the .npz")
            names.add(name)
            if info.flag_bits & 0x1:
                raise InvalidInput(f"encrypted member {name!r} in the .npz")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise InvalidInput(f"member {name!r} uses an unsupported compression method")
            total += info.file_size
            if total > max_uncompressed:
                raise TooLarge(f"the .npz arrays total more than {max_uncompressed} bytes uncompressed")
            if info.file_size > _RATIO_FLOOR_BYTES and info.file_size > _MAX_RATIO * max(info.compress_size, 1):
                raise InvalidInput(
                    f"member {name!r} expands from {info.compress_size} to {info.file_size} bytes: "
                    "refused as a likely zip bomb",
                    errors=[field_error(["file", name], "compression ratio too high", "zip_bomb")],
                )
            # The .npy header declares the shape np.load will allocate: it must match the stored bytes.
            try:
                with zf.open(info) as f:
                    version = npy.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = npy.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = npy.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"unsupported .npy version {version}")
                    header_len = f.tell()
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError) as e:
                raise InvalidInput(f"member {name!r} is not a valid .npy array: {e}") from e
            if dtype.hasobject:
                raise UnsafeFormat(f"member {name!r} is an object array (pickled Python objects), which is refused")
            need = math.prod(shape) * dtype.itemsize
            if need != info.file_size - header_len:
                raise InvalidInput(
                    f"member {name!r} declares shape {tuple(shape)} of {dtype} ({need} bytes) "
                    f"but stores {info.file_size - header_len} bytes",
                    errors=[field_error(["file", name], "declared size does not match the data", "size_mismatch")],
                )


def detect_dataset_format(path: str | os.PathLike) -> DatasetFormat:
    """``"npz"``, ``"safetensors"`` or ``"parquet"`` from the file's bytes (an .npz is fully vetted here)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
            f.seek(max(size - 4, 0))
            tail = f.read(4)
    except FileNotFoundError as e:
        raise InvalidInput(f"dataset file not found: {path}") from e
    except OSError as e:
        raise InvalidInput(f"cannot read dataset file {path}: {e.strerror or e}") from e
    if size == 0:
        raise InvalidInput("the dataset file is empty")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        _check_npz(path)
        return "npz"
    if head[:4] == b"PAR1":
        if tail != b"PAR1":
            raise InvalidInput("truncated parquet file (no closing PAR1 footer)")
        return "parquet"
    if len(head) == 9 and head[8:9] == b"{":  # a safetensors header: an 8-byte length, then a JSON object
        if not 0 < int.from_bytes(head[:8], "little") <= size - 8:
            read_safetensors_header(path)  # raises with the precise reason (truncated, a length past the file)
        return "safetensors"
    if head[:1] == b"\x80":
        raise UnsafeFormat("pickle files are refused as datasets: use .npz, .safetensors or .parquet")
    if head[:6] == b"\x93NUMPY":
        raise InvalidInput("a bare .npy holds a single array: save x and y together with numpy.savez")
    raise InvalidInput("unrecognised dataset file: expected .npz, .safetensors or .parquet")


# --------------------------------------------------------------------------------------------- loaders


def _load_npz(path: str | os.PathLike) -> Dataset:
    _check_npz(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InvalidInput(f"cannot read the .npz arrays: {e}") from e
    return _from_arrays(arrays, ".npz")


def _load_safetensors(path: str | os.PathLike) -> Dataset:
    read_safetensors_header(path)
    try:
        tensors = load_file(os.fspath(path), device="cpu")
    except (SafetensorError, ValueError, RuntimeError, TypeError) as e:
        raise InvalidInput(f"invalid safetensors file: {e}") from e
    arrays: dict[str, np.ndarray] = {}
    for k, t in tensors.items():
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            t = t.float()
        arrays[k] = t.numpy()
    return _from_arrays(arrays, ".safetensors")


def _check_column_names(names: list[str]) -> None:
    """Refuse a parquet schema that names a column twice (Arrow cannot tell such columns apart by name)."""
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicates:
        shown = [n[:200] for n in duplicates[:20]]
        raise InvalidInput(
            f"the parquet file names these columns more than once: {shown}",
            errors=[field_error(["columns", n], "duplicate column name", "duplicate_column") for n in shown],
        )


def _load_parquet(path: str | os.PathLike) -> Dataset:
    import pyarrow as pa  # here, not at the top: pyarrow adds ~35 MiB to every process importing the package
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        _check_column_names(pf.schema_arrow.names)
        meta = pf.metadata
        decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if decoded > MAX_UNCOMPRESSED_BYTES:
            raise TooLarge(f"the parquet data is {decoded} bytes decoded, over the limit of {MAX_UNCOMPRESSED_BYTES}")
        groups, seen = [], 0
        for i in range(meta.num_row_groups):  # decoded size is counted as it is read, not only declared
            group = pf.read_row_group(i)
            seen += group.nbytes
            if seen > MAX_UNCOMPRESSED_BYTES:
                raise TooLarge(f"the parquet data decodes to more than {MAX_UNCOMPRESSED_BYTES} bytes")
            groups.append(group)
        table = pa.concat_tables(groups) if groups else pf.schema_arrow.empty_table()
    except ArboristError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InvalidInput(f"cannot read the parquet file: {e}") from e
    if table.num_rows == 0:
        raise InvalidInput("the dataset is empty: the parquet file has no rows")

    names = table.column_names
    label = next((c for c in _LABEL_COLUMNS if c in names), None)
    if label is None:
        raise InvalidInput(
            f"the parquet file needs a 'label' or 'target' column; columns are {names[:20]}",
            errors=[field_error(["columns"], "no label/target column", "missing")],
        )
    is_val = None
    if _SPLIT_COLUMN in names:
        split = table.column(_SPLIT_COLUMN)
        if not (pa.types.is_string(split.type) or pa.types.is_large_string(split.type)) or split.null_count:
            raise InvalidInput("the 'split' column must hold 'train' or 'val' in every row")
        values = np.asarray(split.to_pylist(), dtype=object)
        unknown = set(values.tolist()) - {"train", "val", "validation"}
        if unknown:
            raise InvalidInput(f"the 'split' column holds unknown values {sorted(unknown)[:5]}: use 'train' or 'val'")
        is_val = np.isin(values, ["val", "validation"])
        if not (~is_val).any():
            raise InvalidInput("the dataset is empty: every row is in the 'val' split")

    features = [c for c in names if c not in (label, _SPLIT_COLUMN, *(_LABEL_COLUMNS))]
    if not features:
        raise InvalidInput("the parquet file has no feature columns besides the label")
    nulls = [c for c in [label, *features] if table.column(c).null_count]
    if nulls:
        raise InvalidInput(
            f"columns with missing values: {nulls[:20]}",
            errors=[field_error(["columns", c], "null values") for c in nulls],
        )

    def numeric(t: pa.DataType) -> bool:
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)

    list_types = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    if features == ["x"] and any(is_list(table.schema.field("x").type) for is_list in list_types):
        col = table.column("x").combine_chunks()
        if not numeric(col.type.value_type):
            raise InvalidInput(f"the list column 'x' must hold numbers, not {col.type.value_type}")
        if hasattr(col, "value_lengths"):
            lengths = np.asarray(col.value_lengths())
        else:
            lengths = np.full(len(col), col.type.list_size)
        if lengths.size and (lengths.min() != lengths.max() or lengths.min() == 0):
            raise InvalidInput("every row of the list column 'x' must hold the same, non-zero number of values")
        flat = col.flatten()
        if flat.null_count:
            raise InvalidInput("the list column 'x' holds missing values")
        x = flat.to_numpy(zero_copy_only=False).reshape(len(col), int(lengths[0]))
    else:
        bad = [c for c in features if not numeric(table.schema.field(c).type)]
        if bad:
            raise InvalidInput(
                f"non-numeric feature columns: {bad[:20]} "
                "(features must be numbers; or put them in one list column 'x')",
                errors=[field_error(["columns", c], f"type {table.schema.field(c).type}", "non_numeric") for c in bad],
            )
        x = np.stack([table.column(c).to_numpy().astype(np.float32, copy=False) for c in features], axis=1)
    ycol = table.column(label)
    if not numeric(ycol.type):
        raise InvalidInput(
            f"the label column {label!r} must be numeric, not {ycol.type}",
            errors=[field_error(["columns", label], "non-numeric", "non_numeric")],
        )
    y = ycol.to_numpy()
    if is_val is None:
        return Dataset(x_train=_features(x, "x"), y_train=_labels(y, "y"))
    return Dataset(
        x_train=_features(x[~is_val], "x"),
        y_train=_labels(y[~is_val], "y"),
        x_val=_features(x[is_val], "x_val") if is_val.any() else None,
        y_val=_labels(y[is_val], "y_val") if is_val.any() else None,
    )


_LOADERS = {"npz": _load_npz, "safetensors": _load_safetensors, "parquet": _load_parquet}


def read_dataset_file(path: str | os.PathLike, fmt: str | None) -> tuple[Dataset, DatasetFormat]:
    """The dataset in a local file and its format, detected from the content (``fmt``, if given, must agree)."""
    if fmt is not None and fmt not in _LOADERS:
        raise InvalidInput(
            f"unknown dataset format {fmt!r}: use one of {sorted(_LOADERS)}",
            errors=[field_error(["format"], "unknown format")],
        )
    detected = detect_dataset_format(path)
    if fmt is not None and fmt != detected:
        raise InvalidInput(
            f"the dataset was declared as {fmt!r} but its content is {detected!r}",
            errors=[field_error(["format"], f"content is {detected}")],
        )
    return _LOADERS[detected](path), detected
