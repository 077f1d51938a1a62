"""Authentication, problem documents for framework errors, and the operational endpoints."""

from __future__ import annotations

import pytest
from _api_testkit import assert_problem

from core.db import crud


@pytest.mark.parametrize("path", ["/v1/models", "/v1/datasets", "/v1/jobs", "/v1/jobs/job_x/metrics"])
def test_missing_key_is_401_problem(server, path):
    resp = server.client().get(path)
    body = assert_problem(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert body["instance"] == path


@pytest.mark.parametrize(
    "header",
    ["Bearer arb_000000000000_nope", "Bearer not-a-key", "Basic dXNlcjpwYXNz", "Bearer arb__x"],
)
def test_invalid_key_is_401_problem(server, header):
    resp = server.client().get("/v1/jobs", headers={"Authorization": header})
    assert_problem(resp, 401, "unauthorized")


def test_tampered_secret_is_401(server, account):
    resp = server.client(account.key[:-2] + "xx").get("/v1/jobs")
    assert_problem(resp, 401)


def test_revoked_key_is_401_problem(server, account):
    assert account.client.get("/v1/jobs").status_code == 200
    prefix = account.key.split("_")[1]
    with server.session() as s:
        crud.revoke_api_key(session=s, prefix=prefix)
    body = assert_problem(account.client.get("/v1/jobs"), 401, "unauthorized")
    assert "revoked" in body["detail"]


def test_unknown_route_and_method_are_problems(server, client):
    assert_problem(client.get("/v1/nope"), 404, "not-found")
    assert_problem(client.put("/v1/jobs"), 405, "method-not-allowed")


def test_healthz_readyz(server):
    c = server.client()
    assert c.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": True, "queue": True}
    server.queue.healthy = False
    try:
        down = c.get("/readyz")
        assert down.status_code == 503
        assert down.json() == {"status": "unavailable", "checks": {"database": True, "queue": False}}
    finally:
        server.queue.healthy = True


def test_prometheus_metrics(server, client, seed):
    model_id, dataset_id = seed()
    client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}})
    client.get("/v1/jobs")
    text = server.client().get("/metrics").text
    assert 'arborist_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in text
    assert "arborist_http_request_duration_seconds_bucket" in text
    assert 'arborist_jobs{state="queued"}' in text
    queued = [ln for ln in text.splitlines() if ln.startswith('arborist_jobs{state="queued"}')][0]
    assert float(queued.split()[-1]) >= 1


def test_openapi_documents_problems(server):
    doc = server.client().get("/openapi.json").json()
    assert "Problem" in doc["components"]["schemas"]
    op = doc["paths"]["/v1/jobs"]["post"]
    assert "application/problem+json" in op["responses"]["422"]["content"]
    assert "default" in op["responses"]
    assert doc["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
