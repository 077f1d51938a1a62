"""Datasets: safe loaders for .npz, .safetensors and .parquet, built-in datasets, and a model/data check.

Files are recognised by their bytes, not their names. Nothing here unpickles: ``.npz`` archives are
checked entry by entry (only ``.npy`` members, declared array sizes that match the stored bytes, a cap
on uncompressed size, a compression-ratio guard) before ``np.load(..., allow_pickle=False)`` reads them.

Conventions: features become float32, integer labels int64 (float labels stay float32, for
regression). ``num_classes`` is ``max(label) + 1`` for integer labels and ``None`` otherwise.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from core.errors import ArboristError, InvalidInput, TooLarge, UnsafeFormat

__all__ = [
    "Dataset",
    "DatasetInfo",
    "DatasetFormat",
    "BUILTIN_DATASETS",
    "DEFAULT_MAX_BYTES",
    "MAX_UNCOMPRESSED_BYTES",
    "detect_dataset_format",
    "load_dataset",
    "validate_dataset_file",
    "builtin_dataset",
    "check_compatible",
    "check_compatible_shapes",
    "holdout_size",
    "max_train_examples",
]

DatasetFormat = Literal["npz", "safetensors", "parquet"]

DEFAULT_MAX_BYTES = 2 * 1024**3  # a dataset file (compressed, as stored)
MAX_UNCOMPRESSED_BYTES = 8 * 1024**3  # all arrays of an .npz / all column chunks of a parquet, decoded
_RATIO_FLOOR_BYTES = 16 * 1024**2  # entries smaller than this are not ratio-checked
_MAX_RATIO = 200  # uncompressed / compressed for a large .npz entry: beyond this it is treated as a bomb

BUILTIN_DATASETS = ("digits", "digits-image")

_X_KEYS = ("x", "inputs")
_Y_KEYS = ("y", "targets")
_LABEL_COLUMNS = ("label", "target")
_SPLIT_COLUMN = "split"


def _err(loc: list, msg: str, typ: str = "value_error") -> dict:
    return {"loc": loc, "msg": msg, "type": typ}


# --------------------------------------------------------------------------------------------- Dataset


@dataclass
class Dataset:
    """Training (and optionally validation) tensors. ``len()`` counts all examples, train + val."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    num_classes: int | None = None
    input_shape: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if (self.x_val is None) != (self.y_val is None):
            raise InvalidInput("a validation split needs both x_val and y_val")
        _check_pair(self.x_train, self.y_train, "train")
        if self.x_val is not None:
            _check_pair(self.x_val, self.y_val, "val")
            if tuple(self.x_val.shape[1:]) != tuple(self.x_train.shape[1:]):
                raise InvalidInput(
                    f"validation inputs have shape {tuple(self.x_val.shape[1:])} per example, "
                    f"training inputs {tuple(self.x_train.shape[1:])}",
                    errors=[_err(["x_val"], "per-example shape differs from x")],
                )
            if self.y_val.is_floating_point() != self.y_train.is_floating_point() or (
                tuple(self.y_val.shape[1:]) != tuple(self.y_train.shape[1:])
            ):
                raise InvalidInput("validation labels differ in kind or shape from the training labels")
        if not self.input_shape:
            self.input_shape = tuple(int(d) for d in self.x_train.shape[1:])
        else:
            self.input_shape = tuple(int(d) for d in self.input_shape)
            if self.input_shape != tuple(self.x_train.shape[1:]):
                raise InvalidInput(f"input_shape {self.input_shape} does not match the data {tuple(self.x_train.shape[1:])}")
        if not self.y_train.is_floating_point():
            top = int(self.y_train.max())
            if self.y_val is not None:
                top = max(top, int(self.y_val.max()))
            if self.num_classes is None:
                self.num_classes = top + 1
            elif top >= int(self.num_classes):
                raise InvalidInput(f"labels reach {top} but num_classes is {self.num_classes}")

    @property
    def has_val(self) -> bool:
        return self.x_val is not None

    @property
    def num_train(self) -> int:
        return len(self.x_train)

    @property
    def num_val(self) -> int:
        return 0 if self.x_val is None else len(self.x_val)

    def __len__(self) -> int:
        return self.num_train + self.num_val

    def split(self, val_fraction: float, seed: int = 0) -> "Dataset":
        """Hold out ``val_fraction`` of the training examples as validation (a seeded permutation).

        A dataset that already has a validation split is returned unchanged: an explicit split wins.
        """
        if not isinstance(val_fraction, (int, float)) or not 0.0 < float(val_fraction) < 1.0:
            raise InvalidInput(
                f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}",
                errors=[_err(["val_fraction"], "must be in (0, 1)")],
            )
        if self.has_val:
            return self
        n = self.num_train
        n_val = holdout_size(n, val_fraction)
        if n_val >= n:
            raise InvalidInput(f"cannot hold out {val_fraction:.0%} of {n} example(s) and keep any for training")
        gen = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(n, generator=gen)
        val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
        return Dataset(
            x_train=self.x_train[train_idx],
            y_train=self.y_train[train_idx],
            x_val=self.x_train[val_idx],
            y_val=self.y_train[val_idx],
            num_classes=self.num_classes,
            input_shape=self.input_shape,
        )


def holdout_size(num_train: int, val_fraction: float) -> int:
    """How many of ``num_train`` examples :meth:`Dataset.split` holds out for validation."""
    return max(1, int(round(num_train * float(val_fraction))))


def max_train_examples(num_examples: int, has_val: bool, val_fraction: float) -> int:
    """An upper bound on the training examples of a run over a dataset of ``num_examples`` (train + val).

    Exact when the dataset has no validation split (a run holds out :func:`holdout_size` of them); with its own
    split, whose size a summary does not record, the split holds at least one example.
    """
    if has_val:
        return max(num_examples - 1, 0)
    return max(num_examples - holdout_size(num_examples, val_fraction), 0)


@dataclass(frozen=True)
class DatasetInfo:
    format: str
    num_examples: int
    input_shape: tuple[int, ...]
    num_classes: int | None
    has_val: bool


def _check_pair(x: Tensor, y: Tensor, split: str) -> None:
    xk, yk = ("x", "y") if split == "train" else ("x_val", "y_val")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InvalidInput(f"{xk} and {yk} must be tensors")
    if x.dim() == 0 or len(x) == 0:
        raise InvalidInput(f"the dataset is empty: {xk} has no examples", errors=[_err([xk], "no examples")])
    if y.dim() == 0 or len(y) != len(x):
        ny = 0 if y.dim() == 0 else len(y)
        raise InvalidInput(
            f"{xk} has {len(x)} examples but {yk} has {ny} labels",
            errors=[_err([yk], f"length {ny}, expected {len(x)}")],
        )
    if not x.is_floating_point():
        raise InvalidInput(f"{xk} must be floating point")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum()) if x.dim() > 1 else int((~torch.isfinite(x)).sum())
        raise InvalidInput(
            f"{xk} holds NaN or Inf values in {bad} example(s)",
            errors=[_err([xk], "NaN or Inf values", "non_finite")],
        )
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()):
            raise InvalidInput(f"{yk} holds NaN or Inf values", errors=[_err([yk], "NaN or Inf values", "non_finite")])
    elif y.dtype == torch.bool or y.is_complex():
        raise InvalidInput(f"{yk} must hold integer or float labels")
    else:
        if y.dim() != 1:
            raise InvalidInput(
                f"integer labels must be one per example, {yk} has shape {tuple(y.shape)}",
                errors=[_err([yk], "expected shape (N,)")],
            )
        lo = int(y.min())
        if lo < 0:
            raise InvalidInput(
                f"{yk} holds negative labels (min {lo}): class labels must be 0, 1, ..., K-1",
                errors=[_err([yk], "negative labels")],
            )


# --------------------------------------------------------------------------------------------- arrays


def _features(a: np.ndarray, key: str) -> Tensor:
    if a.dtype.hasobject:
        raise UnsafeFormat(f"{key} is an object array (pickled data), which is refused")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.issubdtype(a.dtype, np.complexfloating):
        raise InvalidInput(f"{key} must be numeric, got dtype {a.dtype}", errors=[_err([key], f"dtype {a.dtype}")])
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
    raise InvalidInput(f"{key} must be numeric labels, got dtype {a.dtype}", errors=[_err([key], f"dtype {a.dtype}")])


def _from_arrays(arrays: dict[str, np.ndarray], source: str) -> Dataset:
    xk = next((k for k in _X_KEYS if k in arrays), None)
    yk = next((k for k in _Y_KEYS if k in arrays), None)
    if xk is None or yk is None:
        raise InvalidInput(
            f"the {source} file must hold arrays 'x' and 'y' (or 'inputs' and 'targets'); found {sorted(arrays)[:20]}",
            errors=[_err(["file"], "missing x/y arrays", "missing")],
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
    from numpy.lib import format as npy

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
                    errors=[_err(["file", name[:200]], "not an .npy array", "unexpected_member")],
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
                    errors=[_err(["file", name], "compression ratio too high", "zip_bomb")],
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
                raise UnsafeFormat(
                    f"member {name!r} is an object array (pickled Python objects), which is refused"
                )
            need = math.prod(shape) * dtype.itemsize
            if need != info.file_size - header_len:
                raise InvalidInput(
                    f"member {name!r} declares shape {tuple(shape)} of {dtype} ({need} bytes) "
                    f"but stores {info.file_size - header_len} bytes",
                    errors=[_err(["file", name], "declared size does not match the data", "size_mismatch")],
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
            from core.io.model_files import read_safetensors_header

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
    from core.io.model_files import read_safetensors_header
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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


def _load_parquet(path: str | os.PathLike) -> Dataset:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
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
            errors=[_err(["columns"], "no label/target column", "missing")],
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
        raise InvalidInput(f"columns with missing values: {nulls[:20]}", errors=[_err(["columns", c], "null values") for c in nulls])

    def numeric(t: pa.DataType) -> bool:
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)

    if features == ["x"] and (pa.types.is_list(table.schema.field("x").type) or pa.types.is_large_list(table.schema.field("x").type) or pa.types.is_fixed_size_list(table.schema.field("x").type)):
        col = table.column("x").combine_chunks()
        if not numeric(col.type.value_type):
            raise InvalidInput(f"the list column 'x' must hold numbers, not {col.type.value_type}")
        lengths = np.asarray(col.value_lengths()) if hasattr(col, "value_lengths") else np.full(len(col), col.type.list_size)
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
                f"non-numeric feature columns: {bad[:20]} (features must be numbers; or put them in one list column 'x')",
                errors=[_err(["columns", c], f"type {table.schema.field(c).type}", "non_numeric") for c in bad],
            )
        x = np.stack([table.column(c).to_numpy().astype(np.float32, copy=False) for c in features], axis=1)
    ycol = table.column(label)
    if not numeric(ycol.type):
        raise InvalidInput(f"the label column {label!r} must be numeric, not {ycol.type}", errors=[_err(["columns", label], "non-numeric", "non_numeric")])
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


def _load_local(path: str | os.PathLike, fmt: str | None) -> tuple[Dataset, DatasetFormat]:
    if fmt is not None and fmt not in _LOADERS:
        raise InvalidInput(
            f"unknown dataset format {fmt!r}: use one of {sorted(_LOADERS)}",
            errors=[_err(["format"], "unknown format")],
        )
    detected = detect_dataset_format(path)
    if fmt is not None and fmt != detected:
        raise InvalidInput(
            f"the dataset was declared as {fmt!r} but its content is {detected!r}",
            errors=[_err(["format"], f"content is {detected}")],
        )
    return _LOADERS[detected](path), detected


def _load(
    path_or_uri: str | os.PathLike, fmt: str | None, allowed_roots: list[str] | None, max_bytes: int
) -> tuple[Dataset, DatasetFormat]:
    from core.io.uris import _open_local, _split_roots, fetch_to_local, resolve_uri

    target = os.fspath(path_or_uri)
    if allowed_roots is None:
        # A trusted, server-side path (e.g. an upload already stored by the API): no URIs here.
        if "://" in target:
            raise InvalidInput("a data URI needs allowed roots to be checked against")
        local = target
    else:
        from fsspec.implementations.local import LocalFileSystem

        fs, resolved = resolve_uri(target, allowed_roots)
        if not isinstance(fs, LocalFileSystem):
            with tempfile.TemporaryDirectory(prefix="arborist-data-") as tmp:
                fetched = fetch_to_local(target, allowed_roots, tmp, max_bytes)
                return _load_local(fetched, fmt)
        local_roots, _ = _split_roots(allowed_roots)
        f, _size = _open_local(resolved, local_roots)  # regular file, still inside the roots
        f.close()
        local = resolved
    try:
        size = os.path.getsize(local)
    except FileNotFoundError as e:
        raise InvalidInput(f"dataset file not found: {target}") from e
    if not os.path.isfile(local):
        raise InvalidInput(f"not a regular file: {target}")
    if size > max_bytes:
        raise TooLarge(f"the dataset file is {size} bytes, over the limit of {max_bytes} bytes")
    return _load_local(local, fmt)


def load_dataset(
    path_or_uri: str | os.PathLike,
    fmt: DatasetFormat | None = None,
    *,
    allowed_roots: list[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Dataset:
    """Load a dataset file (format detected from content; ``fmt``, if given, must agree).

    With ``allowed_roots`` the location is a user-named path/URI checked by :func:`core.io.uris.resolve_uri`
    (remote files are fetched to a temporary directory under the ``max_bytes`` cap); without, it must be
    a plain local path the server itself chose.
    """
    return _load(path_or_uri, fmt, allowed_roots, max_bytes)[0]


def validate_dataset_file(path: str | os.PathLike, fmt: DatasetFormat | None = None) -> DatasetInfo:
    """Load the file with every check a run applies, and summarise it."""
    data, detected = _load(path, fmt, None, DEFAULT_MAX_BYTES)
    return DatasetInfo(
        format=detected,
        num_examples=len(data),
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        has_val=data.has_val,
    )


# --------------------------------------------------------------------------------------------- built-ins


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (np.asarray(d.data, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    y = np.asarray(d.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def builtin_dataset(name: str) -> Dataset:
    """A bundled dataset: ``"digits"`` (1797×64 in [0, 1], 10 classes) or ``"digits-image"`` (1×8×8)."""
    if name not in BUILTIN_DATASETS:
        raise InvalidInput(
            f"unknown built-in dataset {name!r}: available are {list(BUILTIN_DATASETS)}",
            errors=[_err(["dataset"], "unknown built-in dataset")],
        )
    x, y = _digits_arrays()
    xt = torch.tensor(x)
    if name == "digits-image":
        xt = xt.reshape(-1, 1, 8, 8)
    return Dataset(x_train=xt, y_train=torch.tensor(y), num_classes=10)


# --------------------------------------------------------------------------------------------- checks


def _expected_input(model: nn.Module) -> str:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return f"inputs of {m.in_features} features"
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = {nn.Conv1d: "(C, L)", nn.Conv2d: "(C, H, W)", nn.Conv3d: "(C, D, H, W)"}[type(m)]
            return f"inputs shaped {dims} with C={m.in_channels}"
    return "a different input shape"


def _loss_kind(loss: str):
    from core.engine.grads import Loss

    try:
        return Loss(loss)
    except ValueError as e:
        raise InvalidInput(f"unknown loss {loss!r}: use one of {[l.value for l in Loss]}") from e


def _outputs(
    model: nn.Module, x: Tensor, input_shape: tuple[int, ...], *, may_not_know: bool = False
) -> Tensor | None:
    """``model(x)`` in eval mode without grad; a shape error → InvalidInput. With ``may_not_know`` an op that
    cannot run where ``x`` lives (no 'meta' kernel) gives ``None``: no verdict, rather than a false refusal."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        if may_not_know and isinstance(e, NotImplementedError):
            return None
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else e.__class__.__name__
        raise InvalidInput(
            f"the model does not run on the data: model expects {_expected_input(model)}, "
            f"data has examples shaped {tuple(input_shape)} ({first})",
            errors=[_err(["dataset", "input_shape"], "incompatible with the model")],
        ) from e
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != len(x):
        raise InvalidInput(
            "the model must return one output row per example "
            f"(got {type(out).__name__}{'' if not isinstance(out, Tensor) else ' of shape ' + str(tuple(out.shape))})"
        )
    return out


def _check_targets(out: Tensor, kind, *, float_labels: bool, top: int | None, per_y: int | None) -> None:
    """Model outputs against the labels: integer classes in range for cross_entropy (``top`` the largest label),
    one target per output for mse (``per_y`` targets per example; ``None``: not known, not checked)."""
    from core.engine.grads import Loss

    if kind is Loss.CROSS_ENTROPY:
        if out.dim() != 2:
            raise InvalidInput(f"cross_entropy needs model outputs shaped (N, classes), got {tuple(out.shape)}")
        k = int(out.shape[1])
        if float_labels:
            raise InvalidInput(
                "cross_entropy needs integer class labels, the data has float targets "
                "(store labels as integers, or use the mse loss for regression)",
                errors=[_err(["dataset", "labels"], "float targets", "value_error")],
            )
        if top is not None and top >= k:
            raise InvalidInput(
                f"labels range over [0, {top}] but the model has {k} outputs: labels must lie in [0, {k})",
                errors=[_err(["dataset", "labels"], f"label {top} out of range for {k} outputs")],
            )
    elif per_y is not None:
        per_out = math.prod(out.shape[1:])
        if per_out != per_y:
            raise InvalidInput(
                f"mse needs one target per model output: the model gives {per_out} value(s) per example, "
                f"the data has {per_y}"
            )


def check_compatible(model: nn.Module, data: Dataset, loss: str = "cross_entropy") -> None:
    """Run ``model`` (eval mode, no grad) on two examples; shape or label problems → InvalidInput."""
    kind = _loss_kind(loss)
    out = _outputs(model, data.x_train[:2], data.input_shape)
    assert out is not None
    labels = [data.y_train] + ([data.y_val] if data.y_val is not None else [])
    float_labels = any(y.is_floating_point() for y in labels)
    _check_targets(
        out, kind, float_labels=float_labels, top=None if float_labels else max(int(y.max()) for y in labels),
        per_y=math.prod(data.y_train.shape[1:]),
    )


def check_compatible_shapes(
    model: nn.Module, input_shape: tuple[int, ...] | list[int], num_classes: int | None, loss: str = "cross_entropy"
) -> None:
    """:func:`check_compatible` from a dataset's summary alone (a :class:`DatasetInfo`'s ``input_shape`` and
    ``num_classes``, ``None`` for float targets), for a job not yet run.

    Build ``model`` on the ``"meta"`` device and the forward pass only propagates shapes: nothing is
    allocated or computed. An op without a meta kernel ends the check without a verdict (the run checks
    the real data). mse targets are not summarised, so only their input shape is checked here.
    """
    from core.engine.grads import Loss

    kind = _loss_kind(loss)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    shape = tuple(int(d) for d in input_shape)
    out = _outputs(model, torch.zeros((2, *shape), device=device), shape, may_not_know=True)
    if out is None:
        return
    _check_targets(out, kind, float_labels=num_classes is None and kind is Loss.CROSS_ENTROPY,
                   top=None if num_classes is None else int(num_classes) - 1, per_y=None)
