"""Tenant isolation: another tenant's resources are 404 on every resource route, and lists are empty."""

from __future__ import annotations

from _api_testkit import assert_problem
from core.service.artifacts import artifact_key
from core.service.db import outputs


def test_second_tenant_sees_nothing(server, account, make_account, seed):
    owner = account.client
    model_id, dataset_id = seed()
    job_id = owner.post(
        "/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}}
    ).json()["id"]
    key = artifact_key(job_id, "model.safetensors")
    size, sha = server.store.put_stream(key, [b"weights"])
    with server.session() as s:
        outputs.add_metric(session=s, job_id=job_id, step=0, loss=1.0)
        outputs.add_artifact(session=s, job_id=job_id, name="model.safetensors", path=key, size=size, sha256=sha)
    ids = {"model_id": model_id, "dataset_id": dataset_id, "job_id": job_id, "name": "model.safetensors"}

    other = make_account().client
    doc = server.client().get("/openapi.json").json()
    checked = 0
    for template, item in doc["paths"].items():
        if "{" not in template:
            continue
        path = template.format(**ids)
        for method in item:
            resp = other.request(method.upper(), path, params={"format": "json"} if "metrics" in path else None)
            assert_problem(resp, 404, "not-found")
            checked += 1
    assert checked == 11  # every route with a path parameter

    for path in ("/v1/models", "/v1/datasets", "/v1/jobs"):
        body = other.get(path).json()
        assert body == {"data": [], "count": 0, "next_cursor": None}
    # the owner's inputs cannot be referenced by the other tenant either
    resp = other.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}})
    assert {tuple(e["loc"]) for e in assert_problem(resp, 422)["errors"]} == {
        ("body", "model_id"),
        ("body", "dataset_id"),
    }
    # ...and everything is still there for the owner
    assert owner.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
    assert owner.get(f"/v1/models/{model_id}").status_code == 200
    assert owner.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors").content == b"weights"
