"""Tenant limits (issue #19) on the real API (uvicorn, SQLite and PostgreSQL): 429 problem+json with Retry-After
and the limit in the body, exactly at each limit, nothing created beyond it, at any concurrency; per-tenant
overrides over the settings' defaults; ``GET /v1/usage``.

The running-jobs limit is a scheduling limit (jobs wait, never refused): ``tests/test_scheduling.py``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save as st_save
from sqlalchemy import func, select

from _api_testkit import assert_problem, files_under
from conftest import Account, Harness, serve_app
from core.service.db import inputs, migrate, tenants
from core.service.db.tables import Job, Model
from core.service.settings import Settings

MLP_KWARGS = {"in_features": 64, "hidden": [32], "num_classes": 10}
QUEUED = 2  # every tenant's default
GENEROUS = f"generous-{uuid.uuid4().hex[:8]}"  # a tenant whose own limits are higher
SLOW = f"slow-{uuid.uuid4().hex[:8]}"  # a tenant with a request rate limit
RATE = 0.01  # requests per second: one in the bucket, the next one 100 s away (no timing in the test)


@pytest.fixture(scope="module")
def mlp_bytes() -> bytes:
    from core.io.zoo import build_model

    torch.manual_seed(0)
    return st_save({k: v.contiguous() for k, v in build_model("mlp", **MLP_KWARGS).state_dict().items()})


@pytest.fixture(scope="module")
def quota_server(db_url: str, tmp_path_factory: pytest.TempPathFactory, mlp_bytes: bytes) -> Iterator[Harness]:
    root = tmp_path_factory.mktemp("quotas")
    migrate.upgrade(db_url)
    settings = Settings(
        _env_file=None,
        database_url=db_url,
        artifact_root=str(root / "artifacts"),
        data_allowed_roots=[str(root / "datasets")],
        tenant_queued_jobs=QUEUED,
        tenant_stored_bytes=2 * len(mlp_bytes) + 100,  # two models fit, a third does not
        tenant_limits={
            GENEROUS: {"queued_jobs": 5, "stored_bytes": 10 * len(mlp_bytes)},
            SLOW: {"requests_per_s": RATE},
        },
    )
    with serve_app(settings) as harness:
        yield harness


@pytest.fixture
def new_account(quota_server: Harness) -> Callable[..., Account]:
    def make(name: str | None = None) -> Account:
        with quota_server.session() as s:
            tenant = tenants.get_or_create_tenant(session=s, name=name or f"q-{uuid.uuid4().hex[:10]}")
            _, key = tenants.create_api_key(session=s, tenant=tenant)
        return Account(tenant=tenant, key=key, client=quota_server.client(key))

    return make


def _seed(server: Harness, account: Account) -> tuple[str, str]:
    """A model and a dataset row that fit the default spec (no files: job tests only)."""
    with server.session() as s:
        m = inputs.create_model(
            session=s, tenant=account.tenant, name="m", format="safetensors", size=0, sha256="0" * 64,
            path="models/x.safetensors", arch="mlp", arch_kwargs={"in_features": 64, "hidden": [16], "num_classes": 10},
        )  # fmt: skip
        d = inputs.create_dataset(
            session=s, tenant=account.tenant, name="d", format="npz", size=0, sha256="0" * 64,
            path=None, uri="file:///x.npz", num_examples=1000, input_shape=[64], num_classes=10,
        )  # fmt: skip
        return m.id, d.id


def _submit(client: httpx.Client, model_id: str, dataset_id: str, **extra: object) -> httpx.Response:
    body = {"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}, **extra}
    return client.post("/v1/jobs", json=body)


def _jobs_of(server: Harness, account: Account) -> int:
    with server.session() as s:
        return int(s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == account.tenant.id)) or 0)


def _assert_429(resp: httpx.Response, name: str, value: float) -> dict:
    body = assert_problem(resp, 429, "too-many-requests")
    assert int(resp.headers["Retry-After"]) >= 1
    assert body["limit"]["name"] == name and body["limit"]["value"] == value, body
    return body


def test_queued_jobs_limit_is_exact_and_refuses_with_429(quota_server: Harness, new_account) -> None:
    account = new_account()
    model_id, dataset_id = _seed(quota_server, account)
    for _ in range(QUEUED):
        assert _submit(account.client, model_id, dataset_id).status_code == 202
    body = _assert_429(_submit(account.client, model_id, dataset_id), "queued_jobs", QUEUED)
    assert body["limit"]["used"] == QUEUED and "queued jobs" in body["detail"]
    assert _jobs_of(quota_server, account) == QUEUED  # nothing created beyond the limit
    # Another tenant is not affected by this one's queue.
    other = new_account()
    assert _submit(other.client, *_seed(quota_server, other)).status_code == 202
    # A job leaving the queue makes room again.
    job_id = account.client.get("/v1/jobs").json()["data"][0]["id"]
    assert account.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert _submit(account.client, model_id, dataset_id).status_code == 202
    assert _assert_429(_submit(account.client, model_id, dataset_id), "queued_jobs", QUEUED)
    # Retrying the canceled job would queue a third: refused the same way, the job left canceled.
    _assert_429(account.client.post(f"/v1/jobs/{job_id}/retry"), "queued_jobs", QUEUED)
    assert account.client.get(f"/v1/jobs/{job_id}").json()["state"] == "canceled"


def test_queued_jobs_limit_holds_under_concurrent_submissions(quota_server: Harness, new_account) -> None:
    account = new_account()
    model_id, dataset_id = _seed(quota_server, account)
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda _: _submit(account.client, model_id, dataset_id).status_code, range(8)))
    assert codes == [202] * QUEUED + [429] * (8 - QUEUED), codes
    assert _jobs_of(quota_server, account) == QUEUED


def test_a_tenant_override_wins_over_the_default(quota_server: Harness, new_account) -> None:
    account = new_account(GENEROUS)
    model_id, dataset_id = _seed(quota_server, account)
    codes = [_submit(account.client, model_id, dataset_id).status_code for _ in range(6)]
    assert codes == [202] * 5 + [429], codes
    usage = account.client.get("/v1/usage").json()
    assert usage["tenant"] == GENEROUS
    assert usage["queued_jobs"] == {"limit": 5, "used": 5} and usage["running_jobs"] == {"limit": None, "used": 0}


def _upload(client: httpx.Client, blob: bytes) -> httpx.Response:
    return client.post(
        "/v1/models",
        files={"file": ("mlp.safetensors", blob, "application/octet-stream")},
        data={"name": "mlp", "arch": "mlp", "arch_kwargs": json.dumps(MLP_KWARGS)},
    )


def _stored(server: Harness, account: Account) -> list[Path]:
    return [p for p in files_under(server.store.root) if account.tenant.id in str(p)]


def test_stored_bytes_limit_refuses_the_upload_that_would_pass_it(
    quota_server: Harness, new_account, mlp_bytes: bytes
) -> None:
    account = new_account()
    for _ in range(2):
        assert _upload(account.client, mlp_bytes).status_code == 201
    limit = 2 * len(mlp_bytes) + 100
    body = _assert_429(_upload(account.client, mlp_bytes), "stored_bytes", limit)
    assert body["limit"]["used"] == 2 * len(mlp_bytes)
    with quota_server.session() as s:
        rows = s.scalar(select(func.count()).select_from(Model).where(Model.tenant_id == account.tenant.id))
    assert rows == 2 and len(_stored(quota_server, account)) == 2  # no third row, no third file, no staging left
    usage = account.client.get("/v1/usage").json()
    assert usage["stored_bytes"] == {"limit": limit, "used": 2 * len(mlp_bytes)}
    # Deleting one frees its bytes.
    model_id = account.client.get("/v1/models").json()["data"][0]["id"]
    assert account.client.delete(f"/v1/models/{model_id}").status_code == 204
    assert _upload(account.client, mlp_bytes).status_code == 201


def test_stored_bytes_limit_holds_under_concurrent_uploads(
    quota_server: Harness, new_account, mlp_bytes: bytes
) -> None:
    account = new_account()
    with ThreadPoolExecutor(5) as pool:
        codes = sorted(pool.map(lambda _: _upload(account.client, mlp_bytes).status_code, range(5)))
    assert codes == [201, 201, 429, 429, 429], codes
    assert len(_stored(quota_server, account)) == 2


def test_requests_per_second_per_key(quota_server: Harness, new_account) -> None:
    account = new_account(SLOW)
    assert account.client.get("/v1/usage").status_code == 200  # the bucket's one token
    body = _assert_429(account.client.get("/v1/models"), "requests_per_s", RATE)
    assert "requests per second" in body["detail"]
    # The status poll (its own fast path) counts too.
    _assert_429(account.client.get(f"/v1/jobs/job_{'0' * 28}"), "requests_per_s", RATE)
    # Per key: the tenant's second key has a bucket of its own; other tenants have no rate limit.
    with quota_server.session() as s:
        _, key = tenants.create_api_key(session=s, tenant=account.tenant)
    assert quota_server.client(key).get("/v1/usage").status_code == 200
    other = new_account()
    assert all(other.client.get("/v1/usage").status_code == 200 for _ in range(5))


def test_usage_shows_the_calling_tenants_jobs_and_limits(quota_server: Harness, new_account) -> None:
    account = new_account()
    model_id, dataset_id = _seed(quota_server, account)
    assert _submit(account.client, model_id, dataset_id).status_code == 202
    other = new_account()
    assert _submit(other.client, *_seed(quota_server, other)).status_code == 202
    usage = account.client.get("/v1/usage").json()
    assert usage == {
        "tenant": account.tenant.name,
        "running_jobs": {"limit": None, "used": 0},
        "queued_jobs": {"limit": QUEUED, "used": 1},
        "stored_bytes": {"limit": usage["stored_bytes"]["limit"], "used": 0},
        "requests_per_s": {"limit": None, "used": None},
    }
    assert_problem(quota_server.client().get("/v1/usage"), 401)


def test_the_client_submits_a_priority_and_reads_usage(quota_server: Harness, new_account) -> None:
    from cli.client import ApiError, Client

    account = new_account()
    model_id, dataset_id = _seed(quota_server, account)
    with Client(quota_server.base_url, account.key) as arb:
        job = arb.submit(model_id, dataset_id, {"sparsity": 0.5}, priority=7)
        assert job["priority"] == 7 and arb.job(job["id"])["priority"] == 7
        assert arb.submit(model_id, dataset_id, {"sparsity": 0.5})["priority"] == 0
        assert arb.usage()["queued_jobs"] == {"limit": QUEUED, "used": 2}
        with pytest.raises(ApiError) as refused:
            arb.submit(model_id, dataset_id, {"sparsity": 0.5})
    assert refused.value.status == 429 and refused.value.problem["limit"]["name"] == "queued_jobs"
    out_of_range = account.client.post(
        "/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": {}, "priority": 101}
    )
    assert_problem(out_of_range, 422)
