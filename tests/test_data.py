"""Datasets: loaders for npz/safetensors/parquet, format detection and guards, built-ins, model checks."""

from __future__ import annotations

import pickle
import struct
import time
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from core.errors import Forbidden, InvalidInput, TooLarge, UnsafeFormat
from core.io.data import (
    Dataset,
    DatasetInfo,
    builtin_dataset,
    check_compatible,
    check_compatible_shapes,
    detect_dataset_format,
    load_dataset,
    max_train_examples,
    validate_dataset_file,
)


def _xy(n=20, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, d)).astype(np.float64), rng.integers(0, k, n).astype(np.int32)


class _CreatesFile:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------------------- built-ins


def test_digits():
    d = builtin_dataset("digits")
    assert len(d) == 1797 and d.num_train == 1797 and not d.has_val
    assert d.x_train.shape == (1797, 64) and d.x_train.dtype == torch.float32
    assert d.y_train.dtype == torch.int64 and d.num_classes == 10
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    assert d.input_shape == (64,)
    img = builtin_dataset("digits-image")
    assert img.x_train.shape == (1797, 1, 8, 8) and img.input_shape == (1, 8, 8)
    assert torch.equal(img.x_train.reshape(1797, 64), d.x_train)
    # Fresh tensors each time: mutating one copy does not leak into the next.
    d.x_train[0, 0] = 5.0
    assert float(builtin_dataset("digits").x_train[0, 0]) == 0.0
    with pytest.raises(InvalidInput, match="unknown built-in"):
        builtin_dataset("mnist-but-not-really")


def test_split_is_deterministic_and_partitions():
    d = builtin_dataset("digits")
    a, b, c = d.split(0.2, seed=1), d.split(0.2, seed=1), d.split(0.2, seed=2)
    assert a.num_val == 359 and a.num_train == 1797 - 359 and len(a) == 1797
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_val, c.x_val)
    assert a.num_classes == 10 and a.input_shape == (64,)
    rows = {tuple(r.tolist()) for r in torch.cat([a.x_train, a.x_val])}
    assert len(rows) == len({tuple(r.tolist()) for r in d.x_train})  # nothing lost or duplicated
    assert a.split(0.5, seed=3) is a  # an existing validation split is kept
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(InvalidInput, match="val_fraction"):
            d.split(bad, seed=0)
    tiny = Dataset(torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(InvalidInput):
        tiny.split(0.5, 0)


# ----------------------------------------------------------------------------------------- npz


def test_npz_loads_with_dtype_conversion(tmp_path):
    x, y = _xy()
    xv, yv = _xy(n=6, seed=1)
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=x, y=y, x_val=xv, y_val=yv)
    d = load_dataset(path)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert len(d) == 26 and d.num_val == 6 and d.input_shape == (5,)
    assert d.num_classes == int(max(y.max(), yv.max())) + 1
    np.testing.assert_allclose(d.x_train.numpy(), x.astype(np.float32))
    info = validate_dataset_file(path)
    assert info == DatasetInfo(format="npz", num_examples=26, input_shape=(5,), num_classes=d.num_classes, has_val=True)


def test_npz_alternative_keys_and_regression_targets(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.ones((4, 1, 2, 2)), targets=np.linspace(0, 1, 4))
    d = load_dataset(path, "npz")
    assert d.input_shape == (1, 2, 2) and d.y_train.dtype == torch.float32 and d.num_classes is None


def test_npz_zip_bomb_refused(tmp_path):
    path = tmp_path / "bomb.npz"
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118)
    desc = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, 1), }" % (64 * 1024**2 // 4)
    header += desc.encode().ljust(117) + b"\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            f.write(header)
            zero = b"\0" * (1 << 20)
            for _ in range(64):
                f.write(zero)
        zf.writestr("y.npy", b"")
    assert path.stat().st_size < 200_000
    t0 = time.perf_counter()
    with pytest.raises(InvalidInput, match="zip bomb"):
        load_dataset(path)
    with pytest.raises(InvalidInput, match="zip bomb"):
        detect_dataset_format(path)
    assert time.perf_counter() - t0 < 2.0


def test_npz_header_lying_about_shape_refused(tmp_path):
    # A tiny member whose .npy header declares a terabyte array: refused before np.load allocates it.
    path = tmp_path / "liar.npz"
    desc = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d,), }" % (1 << 38)
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + desc.encode().ljust(117) + b"\n"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", header + b"\0" * 16)
        zf.writestr("y.npy", header + b"\0" * 16)
    with pytest.raises(InvalidInput, match="declares shape"):
        load_dataset(path)


def test_npz_with_other_members_refused(tmp_path):
    x, y = _xy()
    path = tmp_path / "extra.npz"
    np.savez(path, x=x, y=y)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("payload.pkl", pickle.dumps({"a": 1}))
    with pytest.raises(InvalidInput, match=r"only \.npy"):
        detect_dataset_format(path)
    nested = tmp_path / "nested.npz"
    with zipfile.ZipFile(nested, "w") as zf:
        zf.writestr("dir/x.npy", b"")
    with pytest.raises(InvalidInput, match=r"only \.npy"):
        load_dataset(nested)


def test_npz_object_array_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "obj.npz"
    obj = np.empty(2, dtype=object)
    obj[0] = _CreatesFile(str(marker))
    np.savez(path, x=obj, y=np.zeros(2, dtype=np.int64))
    with pytest.raises(UnsafeFormat, match="object array"):
        load_dataset(path)
    assert not marker.exists()


def test_pickle_file_refused_as_dataset(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data.npz"
    path.write_bytes(pickle.dumps(_CreatesFile(str(marker))))
    with pytest.raises(UnsafeFormat):
        load_dataset(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((0, 3)), "y": np.zeros(0, dtype=np.int64)}, "empty"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(3, dtype=np.int64)}, "4 examples but y has 3"),
        ({"x": np.array([[0.0, np.nan], [1.0, 2.0]]), "y": np.array([0, 1])}, "NaN or Inf"),
        ({"x": np.array([[0.0, np.inf], [1.0, 2.0]]), "y": np.array([0, 1])}, "NaN or Inf"),
        ({"x": np.zeros((2, 2)), "y": np.array([0, -1])}, "negative labels"),
        ({"x": np.zeros((2, 2)), "y": np.array([0.5, np.nan])}, "NaN or Inf"),
        ({"x": np.array([["a", "b"], ["c", "d"]]), "y": np.array([0, 1])}, "numeric"),
        ({"x": np.zeros((2, 2)), "labels": np.array([0, 1])}, "'x' and 'y'"),
        ({"x": np.zeros((2, 2)), "y": np.array([0, 1]), "x_val": np.zeros((2, 2))}, "both"),
        ({"x": np.zeros((2, 2)), "y": np.array([0, 1]), "x_val": np.zeros((2, 3)), "y_val": np.array([0, 1])}, "shape"),
    ],
)
def test_npz_content_errors(tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(InvalidInput, match=message):
        load_dataset(path)


def test_empty_archive_and_file(tmp_path):
    empty_zip = tmp_path / "empty.npz"
    with zipfile.ZipFile(empty_zip, "w"):
        pass
    with pytest.raises(InvalidInput, match="empty"):
        load_dataset(empty_zip)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty"):
        load_dataset(empty)
    with pytest.raises(InvalidInput, match="not found"):
        load_dataset(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------------------- safetensors


def test_safetensors_dataset(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"x": torch.rand(10, 1, 4, 4, dtype=torch.float64), "y": torch.arange(10) % 4}, str(path))
    d = load_dataset(path)
    assert d.x_train.dtype == torch.float32 and d.input_shape == (1, 4, 4) and d.num_classes == 4
    assert validate_dataset_file(path).format == "safetensors"
    with pytest.raises(InvalidInput, match="declared as 'npz'"):
        load_dataset(path, "npz")


def test_truncated_safetensors_dataset_refused(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"x": torch.rand(100, 8), "y": torch.zeros(100, dtype=torch.int64)}, str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[:-64])
    with pytest.raises(InvalidInput, match="safetensors"):
        load_dataset(path)


# ----------------------------------------------------------------------------------------- parquet


def test_parquet_numeric_columns(tmp_path):
    x, y = _xy(n=12, d=3)
    table = pa.table({"f0": x[:, 0], "f1": x[:, 1], "f2": x[:, 2].astype(np.float32), "label": y})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    d = load_dataset(path)
    assert d.x_train.shape == (12, 3) and d.y_train.dtype == torch.int64
    np.testing.assert_allclose(d.x_train.numpy(), x.astype(np.float32), rtol=1e-6)
    assert torch.equal(d.y_train, torch.from_numpy(y.astype(np.int64)))


def test_parquet_list_column_and_split(tmp_path):
    rows = [[float(i), float(i) + 0.5] for i in range(6)]
    table = pa.table(
        {"x": rows, "target": [0, 1, 0, 1, 2, 2], "split": ["train", "train", "val", "train", "val", "train"]}
    )
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    d = load_dataset(path)
    assert d.num_train == 4 and d.num_val == 2 and d.input_shape == (2,) and d.num_classes == 3
    assert d.x_val[:, 0].tolist() == [2.0, 4.0]


def test_parquet_errors(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"f0": [1.0, 2.0], "name": ["a", "b"], "label": [0, 1]}), path)
    with pytest.raises(InvalidInput, match="non-numeric") as ei:
        load_dataset(path)
    assert ei.value.errors[0]["loc"] == ["columns", "name"]
    pq.write_table(pa.table({"f0": [1.0, 2.0]}), path)
    with pytest.raises(InvalidInput, match="'label' or 'target'"):
        load_dataset(path)
    pq.write_table(pa.table({"f0": pa.array([], pa.float64()), "label": pa.array([], pa.int64())}), path)
    with pytest.raises(InvalidInput, match="empty"):
        load_dataset(path)
    pq.write_table(pa.table({"f0": [1.0, None], "label": [0, 1]}), path)
    with pytest.raises(InvalidInput, match="missing values"):
        load_dataset(path)
    pq.write_table(pa.table({"x": [[1.0, 2.0], [3.0]], "label": [0, 1]}), path)
    with pytest.raises(InvalidInput, match="same"):
        load_dataset(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(InvalidInput, match="truncated"):
        load_dataset(path)


# ----------------------------------------------------------------------------------------- locations


def test_load_dataset_through_allowed_roots(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    x, y = _xy()
    np.savez(root / "d.npz", x=x, y=y)
    np.savez(tmp_path / "outside.npz", x=x, y=y)
    assert len(load_dataset(f"file://{root}/d.npz", allowed_roots=[str(root)])) == 20
    with pytest.raises(Forbidden):
        load_dataset(str(tmp_path / "outside.npz"), allowed_roots=[str(root)])
    with pytest.raises(Forbidden):
        load_dataset(f"{root}/../outside.npz", allowed_roots=[str(root)])
    with pytest.raises(TooLarge):
        load_dataset(root / "d.npz", allowed_roots=[str(root)], max_bytes=100)
    with pytest.raises(InvalidInput):
        load_dataset("s3://bucket/d.npz")  # a URI with no roots to check it against


# ----------------------------------------------------------------------------------------- compatibility


def test_check_compatible_ok_and_restores_mode():
    d = builtin_dataset("digits")
    model = nn.Sequential(nn.Linear(64, 10), nn.Dropout(0.5))
    model.train()
    check_compatible(model, d)
    assert model.training
    img = builtin_dataset("digits-image")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 10))
    check_compatible(conv, img)


def test_check_compatible_shape_error():
    d = builtin_dataset("digits")
    with pytest.raises(InvalidInput, match=r"model expects inputs of 784 features, data has examples shaped \(64,\)"):
        check_compatible(nn.Sequential(nn.Linear(784, 10)), d)
    conv = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    with pytest.raises(InvalidInput, match=r"C=3.*\(1, 8, 8\)"):
        check_compatible(conv, builtin_dataset("digits-image"))


def test_check_compatible_label_out_of_range():
    d = builtin_dataset("digits")  # labels 0..9
    with pytest.raises(InvalidInput, match=r"labels range over \[0, 9\] but the model has 5 outputs"):
        check_compatible(nn.Linear(64, 5), d)
    # The validation split's labels count too.
    data = Dataset(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]), torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(InvalidInput, match=r"\[0, 2\] but the model has 2 outputs"):
        check_compatible(nn.Linear(2, 2), data)


def test_check_compatible_losses():
    reg = Dataset(torch.rand(6, 3), torch.rand(6, 2))
    check_compatible(nn.Linear(3, 2), reg, loss="mse")
    with pytest.raises(InvalidInput, match="mse"):
        check_compatible(nn.Linear(3, 4), reg, loss="mse")
    with pytest.raises(InvalidInput, match="integer class labels"):
        check_compatible(nn.Linear(3, 2), reg)
    with pytest.raises(InvalidInput, match="unknown loss"):
        check_compatible(nn.Linear(3, 2), reg, loss="hinge")


def test_check_compatible_shapes_from_a_summary_on_the_meta_device():
    """The job-creation check: a zoo model built on 'meta' against a dataset's stored input_shape/num_classes."""
    from core.io.model_files import build_architecture

    mlp = build_architecture("mlp", {"in_features": 64, "hidden": [32], "num_classes": 10}, device="meta")
    assert all(p.is_meta for p in mlp.parameters())
    check_compatible_shapes(mlp, (64,), 10)
    check_compatible_shapes(mlp, (64,), None, loss="mse")  # mse targets are not summarised: shape only
    with pytest.raises(InvalidInput, match=r"model expects inputs of 64 features, data has examples shaped \(32,\)"):
        check_compatible_shapes(mlp, (32,), 10)
    with pytest.raises(InvalidInput, match=r"labels range over \[0, 11\] but the model has 10 outputs"):
        check_compatible_shapes(mlp, (64,), 12)
    with pytest.raises(InvalidInput, match="integer class labels"):
        check_compatible_shapes(mlp, (64,), None)
    conv = build_architecture("resnet20", {}, device="meta")
    check_compatible_shapes(conv, (3, 32, 32), 10)
    with pytest.raises(InvalidInput, match="C=3"):
        check_compatible_shapes(conv, (1, 8, 8), 10)


def test_max_train_examples_bounds_the_split():
    d = Dataset(torch.zeros(10, 2), torch.arange(10) % 2)
    assert max_train_examples(10, False, 0.2) == d.split(0.2).num_train == 8
    assert max_train_examples(10, False, 0.01) == d.split(0.01).num_train == 9  # at least one held out
    assert max_train_examples(10, True, 0.2) == 9  # its own split: at least one example in it
