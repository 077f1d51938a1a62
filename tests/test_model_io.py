"""Safe model loading: formats by content, unsafe formats refused unexecuted, safetensors headers vetted."""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from core.errors import InvalidInput, UnsafeFormat
from core.io.model_files import (
    ModelInfo,
    check_state_dict_matches,
    detect_format,
    load_model,
    load_state_dict,
    read_safetensors_header,
    save_state_dict,
    validate_model_file,
)
from core.io.zoo import build_model


class _CreatesFile:
    """Unpickling this would create ``marker``: proof that a refused file was never unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _raw_safetensors(path, header: dict, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


# ----------------------------------------------------------------------------------------- unsafe formats


def test_raw_pickle_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(_CreatesFile(str(marker)), protocol=4))
    assert path.read_bytes()[0] == 0x80
    with pytest.raises(UnsafeFormat, match="pickle"):
        detect_format(path)
    with pytest.raises(UnsafeFormat):
        load_model(path, arch="mlp")
    with pytest.raises(UnsafeFormat):
        validate_model_file(path)
    assert not marker.exists()


def test_torch_save_zip_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pth"
    torch.save({"state": _CreatesFile(str(marker)), "w": torch.zeros(2)}, path)
    assert path.read_bytes()[:2] == b"PK"
    with pytest.raises(UnsafeFormat, match="pickle"):
        detect_format(path)
    with pytest.raises(UnsafeFormat):
        load_model(path, "safetensors", arch="mlp")
    assert not marker.exists()


def test_legacy_torch_save_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(_tiny().state_dict(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFormat):
        detect_format(path)


def test_torchscript_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(_tiny()).save(str(path))
    with pytest.raises(UnsafeFormat, match="TorchScript"):
        detect_format(path)
    with pytest.raises(UnsafeFormat):
        validate_model_file(path)


def test_torch_export_pt2_refused(tmp_path):
    path = tmp_path / "exported.pt2"
    ep = torch.export.export(_tiny(), (torch.randn(2, 4),))
    torch.export.save(ep, str(path))
    with pytest.raises(UnsafeFormat, match=r"torch\.export"):
        detect_format(path)


def test_extension_is_ignored_content_decides(tmp_path):
    # A pickle named .safetensors is still a pickle; safetensors named .onnx is still safetensors.
    disguised = tmp_path / "weights.safetensors"
    disguised.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeFormat):
        detect_format(disguised)
    real = tmp_path / "model.onnx"
    save_file({"w": torch.zeros(2)}, str(real))
    assert detect_format(real) == "safetensors"


def test_unrelated_files_are_invalid(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"hello, this is not a model at all\n" * 10)
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "hi")
    for p in (empty, garbage, other_zip):
        with pytest.raises(InvalidInput) as ei:
            detect_format(p)
        assert not isinstance(ei.value, UnsafeFormat)
    with pytest.raises(InvalidInput, match="not found"):
        detect_format(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------- safetensors header


def test_header_of_a_valid_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 2), "b": torch.ones(4, dtype=torch.int64)}, str(path), metadata={"k": "v"})
    header = read_safetensors_header(path)
    assert header["a"]["dtype"] == "F32" and header["a"]["shape"] == [3, 2]
    assert header["b"]["dtype"] == "I64"
    assert header["__metadata__"] == {"k": "v"}


def test_truncated_safetensors_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) - 100])  # data section short
    with pytest.raises(InvalidInput, match="outside the data section"):
        read_safetensors_header(cut)
    with pytest.raises(InvalidInput):
        load_state_dict(cut)
    cut.write_bytes(raw[:20])  # cut inside the header
    with pytest.raises(InvalidInput, match="truncated"):
        read_safetensors_header(cut)
    cut.write_bytes(raw[:5])  # not even a length
    with pytest.raises(InvalidInput, match="too short"):
        read_safetensors_header(cut)


def test_header_claiming_a_terabyte_is_refused_quickly(tmp_path):
    path = tmp_path / "huge.safetensors"
    tb = 1 << 40
    _raw_safetensors(path, {"w": {"dtype": "F32", "shape": [tb // 4], "data_offsets": [0, tb]}}, b"\0" * 16)
    t0 = time.perf_counter()
    with pytest.raises(InvalidInput, match="outside the data section"):
        read_safetensors_header(path)
    with pytest.raises(InvalidInput):
        load_state_dict(path)
    assert time.perf_counter() - t0 < 1.0
    # A header whose own length claims a terabyte is refused before being read.
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", tb) + b"{}")
    with pytest.raises(InvalidInput, match="header claims"):
        read_safetensors_header(path)
    # And one that fits the file but exceeds the header cap.
    _raw_safetensors(path, {"__metadata__": {"pad": "x" * 4096}})
    with pytest.raises(InvalidInput, match="over the limit"):
        read_safetensors_header(path, max_header_bytes=1024)


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative"),
        ({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, "needs 8 bytes"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 8, "outside"),
        ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "data_offsets"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        (["not", "an", "object"], b"", "not a JSON object"),
        ({"w": "nope"}, b"", "not an object"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ],
)
def test_malformed_headers(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, header, data)
    with pytest.raises(InvalidInput, match=message):
        read_safetensors_header(path)


def test_header_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 6) + b"{nope}" + b"\0" * 4)
    with pytest.raises(InvalidInput, match="JSON"):
        read_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 7) + b'{"a":1,' + b"\0")
    with pytest.raises(InvalidInput):
        read_safetensors_header(path)


def test_duplicate_keys_refused(tmp_path):
    path = tmp_path / "dup.safetensors"
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    blob = ('{"w":' + entry + ',"w":' + entry + "}").encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)
    with pytest.raises(InvalidInput, match="duplicate"):
        read_safetensors_header(path)


# ----------------------------------------------------------------------------------------- state dicts


def test_save_and_load_state_dict_roundtrip(tmp_path):
    model = _tiny()
    path = save_state_dict(model.state_dict(), tmp_path / "sub" / "w.safetensors", metadata={"arch": "x"})
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]  # no temp files left behind
    loaded = load_state_dict(path)
    assert set(loaded) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v)
    check_state_dict_matches(model, loaded)  # no error
    assert detect_format(path) == "safetensors"


def test_save_state_dict_handles_shared_storage(tmp_path):
    w = torch.randn(4, 4)
    path = save_state_dict({"a": w, "b": w, "c": w[0]}, tmp_path / "shared.safetensors")
    loaded = load_state_dict(path)
    assert torch.equal(loaded["a"], w) and torch.equal(loaded["b"], w) and torch.equal(loaded["c"], w[0])


def test_save_state_dict_leaves_old_file_on_failure(tmp_path):
    path = save_state_dict({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_state_dict({"a": "not a tensor"}, path)
    assert path.read_bytes() == before
    assert len(list(tmp_path.iterdir())) == 1


def test_nan_weights_refused_and_named(tmp_path):
    sd = _tiny().state_dict()
    sd["0.weight"] = sd["0.weight"].clone()
    sd["0.weight"][1, 2] = float("nan")
    sd["2.bias"] = sd["2.bias"].clone()
    sd["2.bias"][0] = float("inf")
    path = save_state_dict(sd, tmp_path / "nan.safetensors")
    with pytest.raises(InvalidInput, match="NaN or Inf") as ei:
        load_state_dict(path)
    assert "0.weight" in ei.value.detail and "2.bias" in ei.value.detail
    assert "0.bias" not in ei.value.detail
    assert {tuple(e["loc"]) for e in ei.value.errors} == {("state_dict", "0.weight"), ("state_dict", "2.bias")}


def test_mismatched_state_dict_lists_every_problem():
    model = _tiny()
    sd = dict(model.state_dict())
    del sd["0.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["2.weight"] = torch.zeros(7, 5)
    with pytest.raises(InvalidInput) as ei:
        check_state_dict_matches(model, sd)
    err = ei.value
    assert "0.bias" in err.detail and "extra.weight" in err.detail and "2.weight" in err.detail
    assert "[7, 5]" in err.detail and "[3, 5]" in err.detail
    kinds = {(e["loc"][1], e["type"]) for e in err.errors}
    assert kinds == {("0.bias", "missing_key"), ("extra.weight", "unexpected_key"), ("2.weight", "shape_mismatch")}


# ----------------------------------------------------------------------------------------- models


def test_load_mlp_from_safetensors(tmp_path):
    kwargs = {"in_features": 8, "hidden": [6], "num_classes": 3}
    torch.manual_seed(1)
    src = build_model("mlp", **kwargs)
    path = save_state_dict(src.state_dict(), tmp_path / "mlp.safetensors")
    model = load_model(path, "safetensors", arch="mlp", arch_kwargs=kwargs)
    assert not model.training
    x = torch.randn(5, 8)
    src.eval()
    assert torch.equal(model(x), src(x))

    info = validate_model_file(path, arch="mlp", arch_kwargs=kwargs)
    assert info == ModelInfo(format="safetensors", num_parameters=8 * 6 + 6 + 6 * 3 + 3, arch="mlp")

    # Wrong architecture arguments: the mismatch is reported, not a crash.
    with pytest.raises(InvalidInput, match="do not match"):
        load_model(path, "safetensors", arch="mlp", arch_kwargs={**kwargs, "hidden": [7]})
    # No arch at all.
    with pytest.raises(InvalidInput, match="architecture") as ei:
        load_model(path)
    assert ei.value.errors[0]["loc"] == ["arch"]
    # Unknown arch.
    with pytest.raises(InvalidInput):
        load_model(path, arch="no-such-arch")
    # Declared format contradicts the content.
    with pytest.raises(InvalidInput, match="declared as 'onnx'"):
        load_model(path, "onnx", arch="mlp", arch_kwargs=kwargs)


def test_load_model_refuses_nan_weights(tmp_path):
    kwargs = {"in_features": 4, "hidden": [3], "num_classes": 2}
    sd = build_model("mlp", **kwargs).state_dict()
    key = next(iter(sd))
    sd[key] = torch.full_like(sd[key], float("nan"))
    path = save_state_dict(sd, tmp_path / "nan.safetensors")
    with pytest.raises(InvalidInput, match=key.replace(".", r"\.")):
        validate_model_file(path, arch="mlp", arch_kwargs=kwargs)


def _onnx_file(tmp_path):
    path = tmp_path / "m.onnx"
    model = _tiny().eval()
    torch.onnx.export(model, (torch.randn(2, 4),), str(path), dynamo=True, external_data=False)
    return path, model


def test_onnx_detected_by_content(tmp_path):
    path, _ = _onnx_file(tmp_path)
    renamed = tmp_path / "weights.safetensors"
    os.replace(path, renamed)
    assert detect_format(renamed) == "onnx"


def test_load_onnx_model(tmp_path):
    path, src = _onnx_file(tmp_path)
    model = load_model(path, "onnx")
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), src(x), rtol=1e-5, atol=1e-5)
    info = validate_model_file(path)
    assert info.format == "onnx" and info.num_parameters == sum(p.numel() for p in src.parameters())
