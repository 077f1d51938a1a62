"""Authentication, problem documents for framework errors, and the operational endpoints."""

from __future__ import annotations

import pytest

from _api_testkit import assert_problem
from core.service.db import tenants


@pytest.mark.parametrize("path", ["/v1/models", "/v1/datasets", "/v1/jobs", "/v1/jobs/job_x/metrics"])
def test_missing_key_is_401_problem(server, path):
    resp = server.client().get(path)
    body = assert_problem(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert body["instance"] == path


# The status poll authenticates in its own query (tenants.authenticated_job), apart from the other routes'
# dependency: every key check runs on both.
POLL = "/v1/jobs/job_0123456789abcdef0123456789ab"


@pytest.mark.parametrize("path", ["/v1/jobs", POLL])
@pytest.mark.parametrize(
    "header",
    ["Bearer arb_000000000000_nope", "Bearer not-a-key", "Basic dXNlcjpwYXNz", "Bearer arb__x"],
)
def test_invalid_key_is_401_problem(server, header, path):
    resp = server.client().get(path, headers={"Authorization": header})
    assert_problem(resp, 401, "unauthorized")


def test_missing_key_on_the_status_poll_is_401(server):
    assert_problem(server.client().get(POLL), 401, "unauthorized")


def _own_job(server, account, seed) -> str:
    model_id, dataset_id = seed()
    resp = account.client.post(
        "/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}}
    )
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def test_tampered_secret_is_401(server, account, seed):
    job_id = _own_job(server, account, seed)
    for path in ("/v1/jobs", f"/v1/jobs/{job_id}"):
        assert account.client.get(path).status_code == 200
        assert_problem(server.client(account.key[:-2] + "xx").get(path), 401)


def test_revoked_key_is_401_problem(server, account, seed):
    job_id = _own_job(server, account, seed)
    paths = ("/v1/jobs", f"/v1/jobs/{job_id}")
    assert [account.client.get(path).status_code for path in paths] == [200, 200]
    prefix = account.key.split("_")[1]
    with server.session() as s:
        tenants.revoke_api_key(session=s, prefix=prefix)
    for path in paths:
        body = assert_problem(account.client.get(path), 401, "unauthorized")
        assert "revoked" in body["detail"]


def test_status_poll_answers_only_its_tenant(server, account, make_account, seed):
    job_id = _own_job(server, account, seed)
    mine = account.client.get(f"/v1/jobs/{job_id}")
    assert mine.status_code == 200 and mine.headers["content-type"] == "application/json"
    assert mine.json()["id"] == job_id and mine.json()["state"] == "queued" and mine.headers["retry-after"] == "2"
    other = make_account()
    assert_problem(other.client.get(f"/v1/jobs/{job_id}"), 404, "not-found")
    for bad in ("job_0123456789abcdef0123456789ab", "nope", job_id.upper()):
        assert_problem(account.client.get(f"/v1/jobs/{bad}"), 404, "not-found")


def test_unknown_route_and_method_are_problems(server, client):
    assert_problem(client.get("/v1/nope"), 404, "not-found")
    assert_problem(client.put("/v1/jobs"), 405, "method-not-allowed")
    # Allow names every route's methods at the path; a static path is its own route's, not a job id's
    assert client.delete("/v1/models/x").status_code != 405
    assert set(client.put("/v1/models/x").headers["allow"].split(", ")) == {"GET", "DELETE"}
    plan = client.options("/v1/jobs/plan")
    assert plan.status_code == 405 and plan.headers["allow"] == "POST", plan.headers


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


def _queued_gauge(text: str) -> float | None:
    lines = [ln for ln in text.splitlines() if ln.startswith('arborist_jobs{state="queued"}')]
    return float(lines[0].split()[-1]) if lines else None


def test_prometheus_metrics(server, client, seed, make_account):
    model_id, dataset_id = seed()
    for _ in range(2):
        r = client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}})
        assert r.status_code == 202, r.text
    client.get("/v1/jobs")
    text = server.client().get("/metrics").text
    assert 'arborist_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in text
    assert "arborist_http_request_duration_seconds_bucket" in text
    # Issue #19: no caller learns how many jobs other tenants have; a tenant's key shows its own jobs only.
    assert "arborist_jobs" not in text
    assert _queued_gauge(client.get("/metrics").text) == 2
    assert _queued_gauge(make_account().client.get("/metrics").text) == 0
    assert server.client("arb_nope_nope").get("/metrics").status_code == 401


def test_openapi_documents_problems(server):
    doc = server.client().get("/openapi.json").json()
    assert "Problem" in doc["components"]["schemas"]
    op = doc["paths"]["/v1/jobs"]["post"]
    assert "application/problem+json" in op["responses"]["422"]["content"]
    assert "default" in op["responses"]
    assert doc["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
