"""Model and dataset uploads: streamed, validated before the row exists, nothing left behind on failure."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save
from sqlalchemy import func, select

from _api_testkit import assert_problem, files_under
from core.service.db.tables import Dataset, Model

MLP_KWARGS = {"in_features": 64, "hidden": [32], "num_classes": 10}


@pytest.fixture(scope="module")
def mlp_bytes() -> bytes:
    from core.io.zoo import build_model

    torch.manual_seed(0)
    model = build_model("mlp", **MLP_KWARGS)
    return st_save({k: v.contiguous() for k, v in model.state_dict().items()})


def _count(server, table, tenant) -> int:
    with server.session() as s:
        return s.scalar(select(func.count()).select_from(table).where(table.tenant_id == tenant.id))


def _tenant_files(server, tenant) -> list:
    return [p for p in files_under(server.store.root) if tenant.id in str(p)]


def test_model_upload_happy_path(server, account, mlp_bytes):
    resp = account.client.post(
        "/v1/models",
        files={"file": ("mlp.safetensors", mlp_bytes, "application/octet-stream")},
        data={"name": "tiny-mlp", "arch": "mlp", "arch_kwargs": json.dumps(MLP_KWARGS)},
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert resp.headers["location"] == f"/v1/models/{body['id']}"
    assert body["name"] == "tiny-mlp" and body["format"] == "safetensors" and body["arch"] == "mlp"
    assert body["arch_kwargs"] == MLP_KWARGS
    assert body["size"] == len(mlp_bytes)
    assert body["sha256"] == hashlib.sha256(mlp_bytes).hexdigest()
    assert body["num_parameters"] == 64 * 32 + 32 + 32 * 10 + 10
    assert "path" not in body
    # stored once, under its final name, with the same bytes; no staging leftovers
    files = _tenant_files(server, account.tenant)
    assert len(files) == 1 and files[0].read_bytes() == mlp_bytes and "staging" not in str(files[0])

    got = account.client.get(f"/v1/models/{body['id']}")
    assert got.status_code == 200 and got.json() == body
    listed = account.client.get("/v1/models").json()
    assert listed["count"] == 1 and [m["id"] for m in listed["data"]] == [body["id"]]

    assert account.client.delete(f"/v1/models/{body['id']}").status_code == 204
    assert_problem(account.client.get(f"/v1/models/{body['id']}"), 404, "not-found")
    assert _tenant_files(server, account.tenant) == []


def test_pickle_upload_refused_415_nothing_left(server, account):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    resp = account.client.post("/v1/models", files={"file": ("model.pt", buf.getvalue())}, data={"arch": "mlp"})
    assert_problem(resp, 415, "unsafe-format")
    raw_pickle = b"\x80\x04\x95" + b"\x00" * 64
    assert_problem(account.client.post("/v1/models", files={"file": ("m.pkl", raw_pickle)}), 415, "unsafe-format")
    assert _count(server, Model, account.tenant) == 0
    assert _tenant_files(server, account.tenant) == []


def test_oversize_upload_refused_413_nothing_left(server, account):
    big = b"\0" * (server.settings.max_upload_bytes + 1)
    resp = account.client.post("/v1/models", files={"file": ("big.safetensors", big)})
    assert_problem(resp, 413, "too-large")

    # a chunked body (no Content-Length) is capped while streaming
    boundary = "arbBoundary"

    def body():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.bin"\r\n\r\n'.encode()
        for _ in range(server.settings.max_upload_bytes // 65536 + 4):
            yield b"\1" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = account.client.post(
        "/v1/models", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert_problem(resp, 413, "too-large")
    assert _count(server, Model, account.tenant) == 0
    assert _tenant_files(server, account.tenant) == []


def test_model_upload_input_errors(server, account, mlp_bytes):
    c = account.client
    files = {"file": ("mlp.safetensors", mlp_bytes)}
    assert_problem(c.post("/v1/models", files=files, data={"arch": "mlp", "arch_kwargs": "{not json"}), 422)
    assert_problem(c.post("/v1/models", files=files, data={"arch": "mlp", "arch_kwargs": "[1]"}), 422)
    # weights that do not fit the named architecture
    wrong = json.dumps({**MLP_KWARGS, "hidden": [16]})
    assert_problem(c.post("/v1/models", files=files, data={"arch": "mlp", "arch_kwargs": wrong}), 422, "invalid-input")
    assert_problem(c.post("/v1/models", files={"file": ("x.bin", b"garbage" * 10)}), 422, "invalid-input")
    body = assert_problem(c.post("/v1/models", data={"name": "nofile"}, files={"other": ("", b"")}), 422)
    assert body["detail"]
    body = assert_problem(c.post("/v1/models", json={"name": "x"}), 422)  # JSON registers a folder by its uri
    assert ["body", "uri"] in [e["loc"] for e in body["errors"]]
    plain = {"Content-Type": "text/plain"}
    assert_problem(c.post("/v1/models", content=b"x", headers=plain), 415, "unsupported-media-type")
    assert _count(server, Model, account.tenant) == 0
    assert _tenant_files(server, account.tenant) == []


def _npz_bytes(n: int = 20) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x=rng.standard_normal((n, 64)).astype(np.float32), y=rng.integers(0, 10, n).astype(np.int64))
    return buf.getvalue()


def test_dataset_upload_and_register(server, account):
    c = account.client
    data = _npz_bytes()
    resp = c.post("/v1/datasets", files={"file": ("train.npz", data)})
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["source"] == "upload" and ds["format"] == "npz" and ds["name"] == "train"
    assert ds["num_examples"] == 20 and ds["input_shape"] == [64] and ds["sha256"] == hashlib.sha256(data).hexdigest()
    assert resp.headers["location"] == f"/v1/datasets/{ds['id']}"

    root = server.settings.data_allowed_roots[0]
    path = f"{root}/registered-{account.tenant.id}.npz"
    with open(path, "wb") as fh:
        fh.write(data)
    reg = c.post("/v1/datasets", json={"uri": path, "name": "reg"})
    assert reg.status_code == 201, reg.text
    assert reg.json()["source"] == "uri" and reg.json()["uri"].startswith("file://")
    assert_problem(c.post("/v1/datasets", json={"uri": "/etc/passwd"}), 403, "forbidden-location")
    body = assert_problem(c.post("/v1/datasets", json={"uri": path, "bogus": 1}), 422, "validation-error")
    assert body["errors"][0]["loc"] == ["body", "bogus"]
    assert_problem(c.post("/v1/datasets", content=b"x", headers={"Content-Type": "text/plain"}), 415)

    listed = c.get("/v1/datasets", params={"limit": 1})
    assert listed.json()["count"] == 2 and len(listed.json()["data"]) == 1
    assert c.delete(f"/v1/datasets/{reg.json()['id']}").status_code == 204
    assert open(path, "rb").read() == data  # the user's registered file is never deleted
    assert c.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert _count(server, Dataset, account.tenant) == 0
    assert _tenant_files(server, account.tenant) == []


def test_delete_refused_while_an_active_job_uses_it(server, account, seed):
    model_id, dataset_id = seed()
    c = account.client
    job = c.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}}).json()
    assert_problem(c.delete(f"/v1/models/{model_id}"), 409, "conflict")
    assert_problem(c.delete(f"/v1/datasets/{dataset_id}"), 409, "conflict")
    assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "canceled"
    assert c.delete(f"/v1/models/{model_id}").status_code == 204
    # the finished job outlives its model; it can no longer be retried
    assert c.get(f"/v1/jobs/{job['id']}").json()["model_id"] is None
    assert_problem(c.post(f"/v1/jobs/{job['id']}/retry"), 409)
