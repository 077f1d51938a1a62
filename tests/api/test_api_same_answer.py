"""Inputs that SQLite used to store and PostgreSQL refused (or that crashed the loader): one answer on both stacks.

* names (of models, datasets, tenants and API keys) with control characters: a NUL went through a multipart file
  name to SQLite and was a database error on PostgreSQL; every control character is now a 422 naming the field,
  wherever the name comes from (a field, a file name, a JSON body, the CLI), and other Unicode is kept as sent;
* integer labels of 2^31 or more: ``num_classes`` is a 32-bit column (stored on SQLite, an overflow on
  PostgreSQL); now a 422 on ``y``, while the largest valid label is stored and read back exactly;
* a parquet file naming a column twice: a 500 (``Field "f" exists 2 times``); now a 422 naming the column.

Each refusal leaves nothing behind: no row, no file in the artifact store.
"""

from __future__ import annotations

import io
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save as st_save
from sqlalchemy import func, select

from _api_testkit import assert_problem, files_under
from core.errors import InvalidInput
from core.service.db import tenants
from core.service.db.tables import ApiKey, Dataset, Model, Tenant

MAX_LABEL = 2**31 - 2  # num_classes = 2^31 - 1, the largest 32-bit integer


def _npz(y: list[int]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.arange(len(y) * 4, dtype=np.float32).reshape(len(y), 4), y=np.asarray(y, dtype=np.int64))
    return buf.getvalue()


def _parquet(names: list[str]) -> bytes:
    columns = [pa.array([0.5, 1.5, 2.5]) for _ in names[:-1]] + [pa.array([0, 1, 0])]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(columns, names=names), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mlp_bytes() -> bytes:
    from core.io.zoo import build_model

    torch.manual_seed(0)
    model = build_model("mlp", in_features=4, hidden=[3], num_classes=2)
    return st_save({k: v.contiguous() for k, v in model.state_dict().items()})


def _stored(server) -> dict[str, Any]:
    with server.session() as s:
        rows = {
            t.__tablename__: s.scalar(select(func.count()).select_from(t)) for t in (Model, Dataset, Tenant, ApiKey)
        }
    return {"rows": rows, "files": sorted(str(p) for p in files_under(server.store.root))}


def _raw_upload(client, kind: str, filename: bytes, content: bytes, fields: dict[str, str]) -> Any:
    """A multipart upload whose file name goes on the wire as these bytes (clients percent-encode some of them)."""
    parts = [
        b'--B\r\nContent-Disposition: form-data; name="' + k.encode() + b'"\r\n\r\n' + v.encode() + b"\r\n"
        for k, v in fields.items()
    ]
    parts.append(b'--B\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n\r\n')
    body = b"".join(parts) + content + b"\r\n--B--\r\n"
    return client.post(f"/v1/{kind}", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"})


def _upload(kind: str, mlp_bytes: bytes) -> tuple[bytes, dict[str, str]]:
    """A valid file of ``kind`` and the form fields it needs."""
    if kind == "models":
        return mlp_bytes, {"arch": "mlp", "arch_kwargs": '{"in_features": 4, "hidden": [3], "num_classes": 2}'}
    return _npz([0, 1, 0]), {}


BAD_NAMES = ["a\x00b", "a\x01b", "tab\there", "new\nline", "\x1b[31mred", "del\x7f", "c1\x85x", "c1\x9b"]


@pytest.mark.parametrize("kind", ["models", "datasets"])
def test_control_characters_in_names_are_422_everywhere(server, client, mlp_bytes, kind):
    content, fields = _upload(kind, mlp_bytes)
    before = _stored(server)
    for bad in BAD_NAMES:
        resp = _raw_upload(client, kind, b"ok.bin", content, {**fields, "name": bad})
        body = assert_problem(resp, 422, "invalid-input")
        assert [e["loc"] for e in body["errors"]] == [["body", "name"]], (bad, body)
        # no name field: the name would come from the file's name, which is refused the same way
        resp = _raw_upload(client, kind, bad.encode() + b".bin", content, fields)
        body = assert_problem(resp, 422, "invalid-input")
        assert [e["loc"] for e in body["errors"]] == [["body", "file"]], (bad, body)
    if kind == "datasets":  # the JSON registration: its schema says the same
        for bad in BAD_NAMES:
            resp = client.post("/v1/datasets", json={"uri": "file:///nowhere/x.npz", "name": bad})
            body = assert_problem(resp, 422, "validation-error")
            assert [e["loc"] for e in body["errors"]] == [["body", "name"]], (bad, body)
    assert _stored(server) == before

    # a bad file name does not matter when a name is sent; any other Unicode is a name, stored as sent
    unicode_name = "résumé ✓ 模型 – v2"
    resp = _raw_upload(client, kind, b"bad\x00name.bin", content, {**fields, "name": unicode_name})
    assert resp.status_code == 201, resp.text
    assert client.get(f"/v1/{kind}/{resp.json()['id']}").json()["name"] == unicode_name


def test_control_characters_in_tenant_and_key_names_are_refused(server, account):
    with server.session() as s:
        for bad in ("k\x00", "k\x07", "k\x9f"):
            with pytest.raises(InvalidInput) as exc:
                tenants.create_api_key(session=s, tenant=account.tenant, name=bad)
            assert exc.value.errors[0]["loc"] == ["name"]
            with pytest.raises(InvalidInput):
                tenants.get_or_create_tenant(session=s, name=f"t-{bad}")
        assert s.scalar(select(func.count()).select_from(Tenant).where(Tenant.name.like("t-k%"))) == 0
        row, _ = tenants.create_api_key(session=s, tenant=account.tenant, name="clé ✓")
        assert s.get(ApiKey, row.id).name == "clé ✓"

    tenant = f"cli-{uuid.uuid4().hex[:6]}\x01"
    cli = [str(Path(sys.executable).parent / "arborist"), "keys", "create", "--url", server.settings.database_url]
    out = subprocess.run([*cli, "--tenant", tenant], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "control character" in out.stderr, out
    with server.session() as s:
        assert s.scalar(select(Tenant).where(Tenant.name == tenant)) is None


def test_labels_of_2_31_or_more_are_422_and_the_largest_valid_one_is_stored(server, client):
    before = _stored(server)
    for top in (MAX_LABEL + 1, 2**31, 2**40):
        resp = client.post("/v1/datasets", files={"file": ("big.npz", _npz([0, 1, top]))})
        body = assert_problem(resp, 422, "invalid-input")
        assert body["errors"][0]["loc"] == ["y"] and str(top) in body["detail"], body
    assert _stored(server) == before

    resp = client.post("/v1/datasets", files={"file": ("max.npz", _npz([0, 1, MAX_LABEL]))})
    assert resp.status_code == 201, resp.text
    assert client.get(f"/v1/datasets/{resp.json()['id']}").json()["num_classes"] == MAX_LABEL + 1


def test_parquet_with_a_column_named_twice_is_422(server, client):
    before = _stored(server)
    for names, dup in ((["f", "f", "label"], "f"), (["a", "label", "label"], "label")):
        resp = client.post("/v1/datasets", files={"file": ("dup.parquet", _parquet(names))})
        body = assert_problem(resp, 422, "invalid-input")
        assert [e["loc"] for e in body["errors"]] == [["columns", dup]] and repr(dup) in body["detail"], body
    assert _stored(server) == before
    resp = client.post("/v1/datasets", files={"file": ("ok.parquet", _parquet(["f", "g", "label"]))})
    assert resp.status_code == 201, resp.text
