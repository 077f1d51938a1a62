"""Issue #6, "Bad inputs", end to end over HTTP: every bad input gets a clear RFC 9457 problem with the right
status, and nothing is written (no new rows, no file left in the artifact store, the data roots or the temporary
directory) and nothing is lost (the resources that existed before are untouched).

One table of cases, one parametrised test (on SQLite and PostgreSQL, through the ``server`` fixture: a real uvicorn
on a real database). Each case builds its request (any setup happens first); the stored state is snapshotted
around the request alone; the problem document is checked: status, ``type``, ``title``, ``detail`` (a regex) and,
where it matters, the located field errors. Payloads that would create a marker file if unpickled prove that
refused files are never unpickled.

Already proven over HTTP elsewhere, so not repeated here:

* an upload just over the size cap (Content-Length, and chunked): 413, nothing left
  (test_api_uploads.py::test_oversize_upload_refused_413_nothing_left); that the server stops reading a far
  larger one is ``test_oversize_upload_is_refused_while_streaming`` below;
* a JSON body over the cap on /v1/jobs (Content-Length, and chunked), text/plain and no content type there
  (test_api_jobs.py::test_content_type_and_size_limits);
* an unknown top-level field and malformed JSON on /v1/jobs (test_api_jobs.py::test_invalid_spec_is_422_with_field_
  errors); an unknown field, text/plain and a bare /etc/passwd on /v1/datasets (test_api_uploads.py::test_dataset_
  upload_and_register); JSON to /v1/models (test_api_uploads.py::test_model_upload_input_errors);
* missing, invalid, tampered and revoked API keys on reads (test_api_auth.py); the writes are below.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import struct
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save
from sqlalchemy import func, select
from torch import nn

from _api_testkit import assert_problem, files_under
from core.service.db import tenants
from core.service.db.tables import ApiKey, Artifact, Dataset, Job, JobEvent, JobMetric, Model

MLP_KWARGS = {"in_features": 64, "hidden": [32], "num_classes": 10}
N_EXAMPLES = 600  # no validation split: a run trains on 600 - round(0.2 * 600) = 480 of them
TRAIN_EXAMPLES = 480
GOOD_SPEC = {"sparsity": 0.5, "fisher": {"samples": 64, "lambda": 1e-3}}


# --- what is stored ----------------------------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored(server, *roots: Path) -> dict[str, Any]:
    """Row counts of every table a request could write, and every file (with its hash) under ``roots``."""
    with server.session() as s:
        rows = {
            t.__tablename__: s.scalar(select(func.count()).select_from(t))
            for t in (Model, Dataset, Job, JobEvent, JobMetric, Artifact, ApiKey)
        }
    files = {str(p): _digest(p) for root in roots for p in files_under(root)}
    return {"rows": rows, "files": files}


# --- payloads ------------------------------------------------------------------------------------------------


class CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: if the marker exists, the server unpickled the upload."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def mlp_state(**overrides: Any) -> dict[str, torch.Tensor]:
    from core.io.zoo import build_model

    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in build_model("mlp", **{**MLP_KWARGS, **overrides}).state_dict().items()}


def raw_safetensors(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def torch_bytes(obj: Any, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def torchscript_bytes() -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Tiny()), buf)
    return buf.getvalue()


def pt2_bytes() -> bytes:
    buf = io.BytesIO()
    torch.export.save(torch.export.export(Tiny(), (torch.randn(2, 4),)), buf)
    return buf.getvalue()


def onnx_model():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.ones((4, 2), np.float32), "w")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), onnx


def onnx_external_data_bytes(tmp: Path) -> bytes:
    """A real external-data ONNX file (weights in w.bin beside it): only the .onnx is uploaded."""
    proto, onnx = onnx_model()
    path = tmp / "ext.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    return path.read_bytes()


def onnx_external_location_bytes(location: str) -> bytes:
    from onnx import TensorProto

    proto, _ = onnx_model()
    t = proto.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    return proto.SerializeToString()


def onnx_tensor_named_bytes(name: str) -> bytes:
    proto, _ = onnx_model()
    proto.graph.initializer[0].name = name
    proto.graph.node[0].input[1] = name
    return proto.SerializeToString()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def classification_npz(n: int = N_EXAMPLES, features: int = 64, classes: int = 10, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes  # every class present: num_classes is exactly ``classes``
    return npz_bytes(x=rng.standard_normal((n, features)).astype(np.float32), y=y.astype(np.int64))


def zip_bomb_npz() -> bytes:
    """64 MiB of zeros declared in a valid .npy header, deflated to ~64 KiB."""
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118)
    header += ("{'descr': '<f4', 'fortran_order': False, 'shape': (%d, 1), }" % (64 * 1024**2 // 4)).encode()
    header = header.ljust(8 + 2 + 117) + b"\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            f.write(header)
            for _ in range(64):
                f.write(b"\0" * (1 << 20))
        zf.writestr("y.npy", b"")
    return buf.getvalue()


def empty_parquet() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"f0": pa.array([], pa.float32()), "label": pa.array([], pa.int64())}), buf)
    return buf.getvalue()


# --- the world the bad requests hit ------------------------------------------------------------------------------


#: fields of a resource that change with the clock, not with requests (a queued job's waiting time)
LIVE_FIELDS = ("queued_seconds", "running_seconds")


def _without(body: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in fields}


@dataclass
class World:
    server: Any
    client: httpx.Client
    revoked_key: str
    tmp: Path  # private: outside every snapshot root (markers, external-data scratch)
    data_root: Path
    store_root: Path
    temp_root: Path  # tempfile.gettempdir() while the module runs
    model_id: str
    dataset_id: str
    registered_id: str
    job_id: str
    narrow_dataset_id: str  # 32 features: the 64-input MLP cannot run on it
    many_classes_dataset_id: str  # labels 0..11: the MLP has 10 outputs
    regression_dataset_id: str  # float targets: cross_entropy needs class labels

    @property
    def marker(self) -> Path:
        return self.tmp / "unpickled-marker"

    def roots(self) -> tuple[Path, ...]:
        return self.store_root, self.data_root, self.temp_root

    def resources(self) -> dict[str, Any]:
        """What a client sees of the resources that existed before (compared before/after each request)."""
        got = {
            p: self.client.get(p)
            for p in (
                f"/v1/models/{self.model_id}",
                f"/v1/datasets/{self.dataset_id}",
                f"/v1/datasets/{self.registered_id}",
                f"/v1/jobs/{self.job_id}",
            )
        }
        assert all(r.status_code == 200 for r in got.values()), {p: r.text for p, r in got.items()}
        return {p: _without(r.json(), LIVE_FIELDS) for p, r in got.items()}


@pytest.fixture(scope="module")
def private_tempdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Points ``tempfile`` (process-wide, so the in-process server too) at a directory of this module's own, so
    a temporary file the server leaves behind shows up in the snapshot and nobody else's can."""
    path = tmp_path_factory.mktemp("tempdir")
    saved = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = saved


def _created(resp: httpx.Response) -> str:
    assert resp.status_code in (201, 202), resp.text
    return resp.json()["id"]


@pytest.fixture(scope="module")
def world(server, private_tempdir: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    with server.session() as s:
        tenant = tenants.get_or_create_tenant(session=s, name=f"bad-inputs-{uuid.uuid4().hex[:8]}")
        _, key = tenants.create_api_key(session=s, tenant=tenant)
        _, revoked = tenants.create_api_key(session=s, tenant=tenant)
        tenants.revoke_api_key(session=s, prefix=revoked.split("_")[1])
    client = server.client(key)

    def upload_dataset(data: bytes, name: str) -> str:
        return _created(client.post("/v1/datasets", files={"file": (f"{name}.npz", data)}, data={"name": name}))

    model_id = _created(
        client.post(
            "/v1/models",
            files={"file": ("mlp.safetensors", st_save(mlp_state()))},
            data={"arch": "mlp", "arch_kwargs": json.dumps(MLP_KWARGS)},
        )
    )
    dataset_id = upload_dataset(classification_npz(), "good")
    data_root = Path(server.settings.data_allowed_roots[0])
    registered = data_root / f"registered-{tenant.id}.npz"
    registered.write_bytes(classification_npz(seed=1))
    registered_id = _created(client.post("/v1/datasets", json={"uri": registered.as_uri()}))
    job_id = _created(client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": GOOD_SPEC}))
    rng = np.random.default_rng(2)
    regression = npz_bytes(
        x=rng.standard_normal((100, 64)).astype(np.float32), y=rng.standard_normal(100).astype(np.float32)
    )
    return World(
        server=server,
        client=client,
        revoked_key=revoked,
        tmp=tmp_path_factory.mktemp("bad-inputs"),
        data_root=data_root,
        store_root=Path(server.store.root),
        temp_root=private_tempdir,
        model_id=model_id,
        dataset_id=dataset_id,
        registered_id=registered_id,
        job_id=job_id,
        narrow_dataset_id=upload_dataset(classification_npz(n=100, features=32), "narrow"),
        many_classes_dataset_id=upload_dataset(classification_npz(n=120, classes=12), "twelve"),
        regression_dataset_id=upload_dataset(regression, "regression"),
    )


# --- requests ------------------------------------------------------------------------------------------------

Send = Callable[[], httpx.Response]


def model_upload(
    data: bytes | Callable[[World], bytes], filename: str = "model.safetensors", **fields: str
) -> Callable[[World], Send]:
    def make(w: World) -> Send:
        payload = data(w) if callable(data) else data
        form = {"arch": "mlp", "arch_kwargs": json.dumps(MLP_KWARGS)} | fields
        return lambda: w.client.post("/v1/models", files={"file": (filename, payload)}, data=form)

    return make


def dataset_upload(
    data: bytes | Callable[[World], bytes], filename: str = "data.npz", **fields: str
) -> Callable[[World], Send]:
    def make(w: World) -> Send:
        payload = data(w) if callable(data) else data
        return lambda: w.client.post("/v1/datasets", files={"file": (filename, payload)}, data=fields)

    return make


def register(uri: Callable[[World], str]) -> Callable[[World], Send]:
    def make(w: World) -> Send:
        u = uri(w)
        return lambda: w.client.post("/v1/datasets", json={"uri": u})

    return make


def register_file(name: str, content: bytes | Callable[[World], bytes]) -> Callable[[World], Send]:
    """A file put under the allowed root first (setup, before the snapshot), then registered."""

    def make(w: World) -> Send:
        path = w.data_root / f"{uuid.uuid4().hex[:8]}-{name}"
        path.write_bytes(content(w) if callable(content) else content)
        return lambda: w.client.post("/v1/datasets", json={"uri": path.as_uri()})

    return make


def job(spec: dict | None = None, dataset: str = "dataset_id", **body: Any) -> Callable[[World], Send]:
    def make(w: World) -> Send:
        payload = {"model_id": w.model_id, "dataset_id": getattr(w, dataset), "spec": spec or GOOD_SPEC} | body
        return lambda: w.client.post("/v1/jobs", json=payload)

    return make


def raw(path: str, content: bytes, content_type: str) -> Callable[[World], Send]:
    def make(w: World) -> Send:
        return lambda: w.client.post(path, content=content, headers={"Content-Type": content_type})

    return make


def unauthenticated(key: str, what: str) -> Callable[[World], Send]:
    """A write with a missing / invalid / revoked key: refused before the body is read."""

    def make(w: World) -> Send:
        headers = {
            "Authorization": {
                "none": "",
                "invalid": "Bearer arb_000000000000_nope",
                "revoked": f"Bearer {w.revoked_key}",
            }[key]
        }
        if what == "model":
            return lambda: w.client.post(
                "/v1/models",
                headers=headers,
                data={"arch": "mlp"},
                files={"file": ("m.safetensors", st_save(mlp_state()))},
            )
        if what == "dataset":
            return lambda: w.client.post(
                "/v1/datasets", headers=headers, files={"file": ("d.npz", classification_npz())}
            )
        return lambda: w.client.post(
            "/v1/jobs", headers=headers, json={"model_id": w.model_id, "dataset_id": w.dataset_id, "spec": GOOD_SPEC}
        )

    return make


# --- the cases -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    send: Callable[[World], Send]
    status: int
    slug: str
    detail: str = ""  # a regex the problem's detail must contain
    errors: tuple[tuple, ...] = ()  # locs (tuples) that must appear in the problem's field errors
    unpickle_bait: bool = False  # the payload would create World.marker if it were ever unpickled


def _mismatched_state() -> bytes:
    state = mlp_state(hidden=[16])  # every weight touching the hidden layer has the wrong shape
    del state["layers.3.bias"]
    state["head.weight"] = torch.zeros(2, 2)
    return st_save(state)


def _poisoned_state(value: float) -> bytes:
    state = mlp_state()
    state["layers.3.weight"][1, 2] = value
    return st_save(state)


def _truncated(cut: int) -> Callable[[World], bytes]:
    return lambda w: st_save(mlp_state())[:cut]


TB = 1 << 40
VALIDATION = "validation-error"  # pydantic: the request's shape (field errors in ``errors``)
INVALID = "invalid-input"  # the content: a file, a URI, a spec against its inputs
UNSAFE = "unsafe-format"  # would run code if loaded (pickle, TorchScript, torch.export, ONNX reaching outside)
FORBIDDEN = "forbidden-location"

CASES = [
    # --- model files -------------------------------------------------------------------------------------------
    Case(
        "model/pickle-raw",
        model_upload(lambda w: pickle.dumps(CreatesFile(str(w.marker)), protocol=4), "m.pkl"),
        415,
        UNSAFE,
        r"pickle",
        unpickle_bait=True,
    ),
    Case(
        "model/pickle-protocol0",
        model_upload(lambda w: pickle.dumps(CreatesFile(str(w.marker)), protocol=0), "m.pth"),
        422,
        INVALID,
        r"unrecognised model file",
        unpickle_bait=True,
    ),
    Case(
        "model/torch-save-zip",
        model_upload(lambda w: torch_bytes({"w": torch.zeros(2), "x": CreatesFile(str(w.marker))}), "m.pt"),
        415,
        UNSAFE,
        r"pickle-based PyTorch checkpoints",
        unpickle_bait=True,
    ),
    Case(
        "model/torch-save-legacy",
        model_upload(
            lambda w: torch_bytes({"x": CreatesFile(str(w.marker))}, _use_new_zipfile_serialization=False), "m.pth"
        ),
        415,
        UNSAFE,
        r"pickle",
        unpickle_bait=True,
    ),
    Case("model/torchscript", model_upload(lambda w: torchscript_bytes(), "m.pt"), 415, UNSAFE, r"TorchScript"),
    Case("model/torch-export-pt2", model_upload(lambda w: pt2_bytes(), "m.pt2"), 415, UNSAFE, r"torch\.export"),
    Case(
        "model/safetensors-truncated-data",
        model_upload(_truncated(-100)),
        422,
        INVALID,
        r"invalid safetensors file: .*outside the data section",
    ),
    Case(
        "model/safetensors-truncated-header",
        model_upload(_truncated(20)),
        422,
        INVALID,
        r"invalid safetensors file: the header claims \d+ bytes but the file has only 12 .*\(truncated\?\)",
    ),
    Case(
        "model/safetensors-header-not-json",
        model_upload(raw_safetensors(b"{not json at all}", b"\0" * 8)),
        422,
        INVALID,
        r"not valid UTF-8 JSON",
    ),
    Case(
        "model/safetensors-no-tensors",
        model_upload(raw_safetensors(b"{}" + b" " * 6)),
        422,
        INVALID,
        r"do not match the architecture: missing 4",
    ),
    Case(
        "model/safetensors-claims-1TB-tensor",
        model_upload(
            raw_safetensors(
                {"layers.1.weight": {"dtype": "F32", "shape": [TB // 4], "data_offsets": [0, TB]}}, b"\0" * 16
            )
        ),
        422,
        INVALID,
        r"data_offsets \[0, 1099511627776\] fall outside the data section of 16 bytes",
        errors=(("tensors", "layers.1.weight"),),
    ),
    Case(
        "model/safetensors-claims-exabyte-shape",
        model_upload(
            raw_safetensors({"w": {"dtype": "F64", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 8]}}, b"\0" * 8)
        ),
        422,
        INVALID,
        r"needs \d+ bytes but data_offsets span 8",
    ),
    Case(
        "model/safetensors-header-length-1TB",
        model_upload(struct.pack("<Q", TB) + b'{"a": 1}'),
        422,
        INVALID,
        r"the header claims 1099511627776 bytes but the file has only 8",
    ),
    Case(
        "model/onnx-external-data",
        model_upload(lambda w: onnx_external_data_bytes(w.tmp), "m.onnx"),
        415,
        UNSAFE,
        r"external data",
    ),
    Case(
        "model/onnx-external-traversal",
        model_upload(onnx_external_location_bytes("../../etc/passwd"), "m.onnx"),
        415,
        UNSAFE,
        r"outside the model",
    ),
    Case(
        "model/onnx-external-absolute",
        model_upload(onnx_external_location_bytes("/etc/passwd"), "m.onnx"),
        415,
        UNSAFE,
        r"outside the model",
    ),
    Case(
        "model/onnx-tensor-name-traversal",
        model_upload(onnx_tensor_named_bytes("../../w"), "m.onnx"),
        415,
        UNSAFE,
        r"outside the model",
    ),
    Case(
        "model/nan-weights",
        model_upload(_poisoned_state(float("nan"))),
        422,
        INVALID,
        r"NaN or Inf values in 1 tensor\(s\): layers\.3\.weight",
        errors=(("state_dict", "layers.3.weight"),),
    ),
    Case(
        "model/inf-weights",
        model_upload(_poisoned_state(float("-inf"))),
        422,
        INVALID,
        r"NaN or Inf values in 1 tensor\(s\): layers\.3\.weight",
    ),
    Case(
        "model/tensors-do-not-match-arch",
        model_upload(_mismatched_state()),
        422,
        INVALID,
        r"do not match the architecture: missing 1: layers\.3\.bias; unexpected 1: head\.weight; "
        r"shape mismatches 3: layers\.1\.weight \(file \[16, 64\], model \[32, 64\]\)",
        errors=(
            ("state_dict", "layers.3.bias"),
            ("state_dict", "head.weight"),
            ("state_dict", "layers.1.bias"),
            ("state_dict", "layers.3.weight"),
        ),
    ),
    Case(
        "model/unknown-arch", model_upload(st_save(mlp_state()), arch="mlp9000"), 422, INVALID, r"unknown architecture"
    ),
    Case(
        "model/unknown-form-field",
        model_upload(st_save(mlp_state()), arch_kwarg="{}"),
        422,
        INVALID,
        r"unknown form field\(s\): arch_kwarg",
        errors=(("body", "arch_kwarg"),),
    ),
    Case("model/empty-file", model_upload(b""), 422, INVALID, r"empty"),
    Case(
        "model/form-urlencoded",
        raw("/v1/models", b"arch=mlp", "application/x-www-form-urlencoded"),
        415,
        "unsupported-media-type",
        r"multipart/form-data",
    ),
    Case(
        "model/multipart-without-boundary",
        raw("/v1/models", b"--x\r\n", "multipart/form-data"),
        422,
        INVALID,
        r"without a boundary",
    ),
    # --- dataset files -----------------------------------------------------------------------------------------
    Case(
        "dataset/zip-bomb",
        dataset_upload(zip_bomb_npz()),
        422,
        INVALID,
        r"likely zip bomb",
        errors=(("file", "x.npy"),),
    ),
    Case(
        "dataset/safetensors-truncated",
        dataset_upload(lambda w: st_save({"x": torch.zeros(8, 4), "y": torch.zeros(8)})[:30], "d.st"),
        422,
        INVALID,
        r"invalid safetensors file: the header claims \d+ bytes .*\(truncated\?\)",
    ),
    Case(
        "dataset/empty-arrays",
        dataset_upload(npz_bytes(x=np.zeros((0, 64), np.float32), y=np.zeros(0, np.int64))),
        422,
        INVALID,
        r"the dataset is empty",
    ),
    Case("dataset/empty-archive", dataset_upload(npz_bytes()), 422, INVALID, r"the dataset is empty"),
    Case("dataset/empty-parquet", dataset_upload(empty_parquet(), "d.parquet"), 422, INVALID, r"the dataset is empty"),
    Case("dataset/empty-file", dataset_upload(b""), 422, INVALID, r"the dataset file is empty"),
    Case(
        "dataset/pickle",
        dataset_upload(lambda w: pickle.dumps(CreatesFile(str(w.marker))), "d.pkl"),
        415,
        UNSAFE,
        r"pickle",
        unpickle_bait=True,
    ),
    Case(
        "dataset/npz-object-array",
        dataset_upload(lambda w: npz_bytes(x=np.array([CreatesFile(str(w.marker))], dtype=object), y=np.zeros(1))),
        415,
        UNSAFE,
        r"object array",
        unpickle_bait=True,
    ),
    Case(
        "dataset/nan-features",
        dataset_upload(npz_bytes(x=np.full((4, 64), np.nan, np.float32), y=np.zeros(4, np.int64))),
        422,
        INVALID,
        r"NaN or Inf",
    ),
    Case(
        "dataset/labels-not-matching-examples",
        dataset_upload(npz_bytes(x=np.zeros((4, 64), np.float32), y=np.zeros(3, np.int64))),
        422,
        INVALID,
        r"x has 4 examples but y has 3 labels",
    ),
    Case(
        "dataset/unknown-form-field",
        dataset_upload(classification_npz(), fromat="npz"),
        422,
        INVALID,
        r"unknown form field\(s\): fromat",
    ),
    # --- data URIs ---------------------------------------------------------------------------------------------
    Case(
        "uri/file-etc-passwd",
        register(lambda w: "file:///etc/passwd"),
        403,
        FORBIDDEN,
        r"outside the allowed",
        errors=(("uri",),),
    ),
    Case(
        "uri/dotdot-traversal",
        register(lambda w: f"{w.data_root}/../../../../../etc/passwd"),
        403,
        FORBIDDEN,
        r"outside the allowed",
    ),
    Case(
        "uri/dotdot-into-the-store",
        register(lambda w: f"{w.data_root.as_uri()}/../artifacts/"),
        403,
        FORBIDDEN,
        r"outside the allowed",
    ),
    Case(
        "uri/encoded-dotdot",
        register(lambda w: f"{w.data_root.as_uri()}/%2e%2e/%2e%2e/%2e%2e/etc/passwd"),
        403,
        FORBIDDEN,
        r"outside the allowed",
    ),
    Case(
        "uri/symlink-out-of-root",
        register(lambda w: _symlink(w, "/etc/passwd")),
        403,
        FORBIDDEN,
        r"outside the allowed",
    ),
    Case("uri/file-remote-host", register(lambda w: "file://evil.example/etc/passwd"), 403, FORBIDDEN, r"remote host"),
    Case(
        "uri/http",
        register(lambda w: "http://169.254.169.254/latest/meta-data"),
        403,
        FORBIDDEN,
        r"unsupported scheme 'http'",
    ),
    Case("uri/https", register(lambda w: "https://example.com/d.npz"), 403, FORBIDDEN, r"unsupported scheme 'https'"),
    Case("uri/ftp", register(lambda w: "ftp://example.com/d.npz"), 403, FORBIDDEN, r"unsupported scheme 'ftp'"),
    Case(
        "uri/data",
        register(lambda w: "data:application/octet-stream;base64,AAAA"),
        403,
        FORBIDDEN,
        r"unsupported scheme 'data'",
    ),
    Case(
        "uri/s3-unconfigured", register(lambda w: "s3://bucket/datasets/d.npz"), 403, FORBIDDEN, r"outside the allowed"
    ),
    Case(
        "uri/missing-file-inside-root",
        register(lambda w: f"{w.data_root}/nope-{uuid.uuid4().hex}.npz"),
        422,
        INVALID,
        r"is not a file",
    ),
    Case("uri/the-root-itself", register(lambda w: str(w.data_root)), 422, INVALID, r"is not a file"),
    Case("uri/nul-byte", register(lambda w: f"{w.data_root}/a\x00.npz"), 422, INVALID, r"NUL"),
    Case("uri/empty", register(lambda w: ""), 422, VALIDATION, r"uri", errors=(("body", "uri"),)),
    Case(
        "uri/registered-empty-dataset",
        register_file("empty.npz", npz_bytes(x=np.zeros((0, 3), np.float32), y=np.zeros(0, np.int64))),
        422,
        INVALID,
        r"the dataset is empty",
    ),
    Case("uri/registered-zip-bomb", register_file("bomb.npz", zip_bomb_npz()), 422, INVALID, r"likely zip bomb"),
    Case(
        "uri/registered-pickle",
        register_file("p.pkl", lambda w: pickle.dumps(CreatesFile(str(w.marker)))),
        415,
        UNSAFE,
        r"pickle",
        unpickle_bait=True,
    ),
    Case(
        "uri/huge-json",
        raw("/v1/datasets", json.dumps({"uri": "x" * 20_000}).encode(), "application/json"),
        413,
        "too-large",
        r"JSON body exceeds",
    ),
    Case(
        "uri/xml",
        raw("/v1/datasets", b"<uri>/etc/passwd</uri>", "application/xml"),
        415,
        "unsupported-media-type",
        r"multipart/form-data .* or application/json",
    ),
    Case("uri/json-not-an-object", raw("/v1/datasets", b"[]", "application/json"), 422, VALIDATION, r""),
    Case(
        "uri/deeply-nested-json",
        raw("/v1/datasets", b'{"uri": "x", "name": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json"),
        422,
        VALIDATION,
        r"recursion limit",
    ),
    # --- specs and job inputs ----------------------------------------------------------------------------------
    Case(
        "spec/sparsity-zero",
        job({"sparsity": 0.0}),
        422,
        VALIDATION,
        r"spec\.sparsity",
        errors=(("body", "spec", "sparsity"),),
    ),
    Case(
        "spec/sparsity-one",
        job({"sparsity": 1.0}),
        422,
        VALIDATION,
        r"spec\.sparsity",
        errors=(("body", "spec", "sparsity"),),
    ),
    Case(
        "spec/sparsity-negative", job({"sparsity": -0.2}), 422, VALIDATION, r"", errors=(("body", "spec", "sparsity"),)
    ),
    Case(
        "spec/sparsity-missing",
        job({"method": "woodfisher"}),
        422,
        VALIDATION,
        r"Field required",
        errors=(("body", "spec", "sparsity"),),
    ),
    Case(
        "spec/lambda-negative",
        job({"sparsity": 0.5, "fisher": {"lambda": -1e-3}}),
        422,
        VALIDATION,
        r"lambda must be > 0",
        errors=(("body", "spec", "fisher", "lambda"),),
    ),
    Case("spec/lambda-zero", job({"sparsity": 0.5, "fisher": {"lambda": 0}}), 422, VALIDATION, r"lambda must be > 0"),
    Case(
        "spec/lambda-grid-negative",
        job({"sparsity": 0.5, "fisher": {"lambda": "auto", "lambda_grid": [1e-3, -1]}}),
        422,
        VALIDATION,
        r"lambda_grid must hold positive values",
    ),
    Case("spec/block-size-zero", job({"sparsity": 0.5, "fisher": {"block_size": 0}}), 422, VALIDATION, r"block_size"),
    Case(
        "spec/block-size-negative", job({"sparsity": 0.5, "fisher": {"block_size": -4}}), 422, VALIDATION, r"block_size"
    ),
    Case(
        "spec/samples-zero",
        job({"sparsity": 0.5, "fisher": {"samples": 0}}),
        422,
        VALIDATION,
        r"",
        errors=(("body", "spec", "fisher", "samples"),),
    ),
    Case(
        "spec/samples-over-the-dataset",
        job({"sparsity": 0.5, "fisher": {"samples": TRAIN_EXAMPLES + 1}}),
        422,
        INVALID,
        rf"fisher\.samples × fisher\.batch_size = 481 exceeds the {TRAIN_EXAMPLES} training examples",
        errors=(("body", "spec", "fisher", "samples"),),
    ),
    Case(
        "spec/samples-times-batch-over-the-dataset",
        job({"sparsity": 0.5, "fisher": {"samples": 100, "batch_size": 5}}),
        422,
        INVALID,
        r"= 500 exceeds the 480",
    ),
    Case(
        "spec/unknown-field",
        job({"sparsity": 0.5, "sparsty": 0.9}),
        422,
        VALIDATION,
        r"",
        errors=(("body", "spec", "sparsty"),),
    ),
    Case(
        "spec/unknown-nested-field",
        job({"sparsity": 0.5, "fisher": {"m": 64}}),
        422,
        VALIDATION,
        r"",
        errors=(("body", "spec", "fisher", "m"),),
    ),
    Case(
        "spec/unknown-method",
        job({"sparsity": 0.5, "method": "obs++"}),
        422,
        VALIDATION,
        r"",
        errors=(("body", "spec", "method"),),
    ),
    Case(
        "spec/deeply-nested-json",
        raw("/v1/jobs", b'{"spec": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json"),
        400,
        "bad-request",
        r"error parsing the body",
    ),
    Case(
        "spec/multipart",
        raw("/v1/jobs", b"--b\r\n", "multipart/form-data; boundary=b"),
        415,
        "unsupported-media-type",
        r"JSON",
    ),
    Case(
        "job/dataset-shape-does-not-fit-model",
        job(dataset="narrow_dataset_id"),
        422,
        INVALID,
        r"model expects inputs of 64 features, data has examples shaped \(32,\)",
        errors=(("body", "dataset_id"),),
    ),
    Case(
        "job/labels-out-of-model-range",
        job(dataset="many_classes_dataset_id"),
        422,
        INVALID,
        r"labels range over \[0, 11\] but the model has 10 outputs",
        errors=(("body", "dataset_id"),),
    ),
    Case(
        "job/float-labels-for-cross-entropy",
        job(dataset="regression_dataset_id"),
        422,
        INVALID,
        r"cross_entropy needs integer class labels",
    ),
    # --- credentials on writes (reads: test_api_auth.py) -------------------------------------------------------
    *[
        Case(
            f"auth/{key}-key-{what}",
            unauthenticated(key, what),
            401,
            "unauthorized",
            r"revoked" if key == "revoked" else r"",
        )
        for key in ("none", "invalid", "revoked")
        for what in ("model", "dataset", "job")
    ],
]


def _symlink(w: World, target: str) -> str:
    link = w.data_root / f"link-{uuid.uuid4().hex[:8]}.npz"
    link.symlink_to(target)
    return str(link)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_a_problem_and_changes_nothing(world: World, case: Case) -> None:
    send = case.send(world)  # payload and setup first: only the request itself is inside the snapshot
    world.marker.unlink(missing_ok=True)
    before, seen_before = stored(world.server, *world.roots()), world.resources()

    resp = send()

    body = assert_problem(resp, case.status, case.slug)
    assert isinstance(body.get("detail"), str) and body["detail"].strip(), body
    assert re.search(case.detail, body["detail"]), body["detail"]
    locs = {tuple(e["loc"]) for e in body.get("errors", [])}
    assert set(case.errors) <= locs, body
    if case.unpickle_bait:
        assert not world.marker.exists(), "the upload was unpickled"
    assert stored(world.server, *world.roots()) == before, "a refused request left something behind"
    assert world.resources() == seen_before, "a refused request changed an existing resource"


def test_unpickle_bait_is_live(world: World) -> None:
    """The marker payloads are real: unpickling one does create the marker (so its absence above means something)."""
    world.marker.unlink(missing_ok=True)
    pickle.loads(pickle.dumps(CreatesFile(str(world.marker)))).close()
    assert world.marker.exists()
    world.marker.unlink()


def test_oversize_upload_is_refused_while_streaming(world: World) -> None:
    """A chunked upload far over the cap: the server stops reading near the cap instead of draining it all
    (status and nothing-left for uploads just over the cap: test_api_uploads.py)."""
    cap = world.server.settings.max_upload_bytes
    total = 64 * 1024 * 1024
    sent = 0
    boundary = "arbBoundary"

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.safetensors"\r\n\r\n'.encode()
        chunk = b"\1" * 65536
        while sent < total:
            sent += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    before = stored(world.server, *world.roots())
    t0 = time.perf_counter()
    try:
        resp = world.client.post(
            "/v1/models", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
    except httpx.TransportError:
        resp = None  # the server answered and closed the connection while the client was still sending
    if resp is not None:
        assert_problem(resp, 413, "too-large")
        assert resp.headers.get("connection") == "close"  # the rest of the body is not drained
    assert sent < total // 2, f"the server read {sent} bytes of a {total}-byte upload capped at {cap}"
    assert time.perf_counter() - t0 < 30
    assert stored(world.server, *world.roots()) == before
