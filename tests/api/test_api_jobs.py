"""Jobs: create (202 + Location, idempotency), validation, listing, cancel/retry, queue routing."""

from __future__ import annotations

import pytest

from _api_testkit import assert_problem
from core.service.db import attempts, jobs
from core.service.db.tables import JobState


@pytest.fixture
def inputs(seed):
    return seed()


def _body(inputs, **spec):
    model_id, dataset_id = inputs
    return {"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5, **spec}}


def test_create_job_202_location_and_enqueue(server, client, inputs):
    resp = client.post("/v1/jobs", json=_body(inputs))
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["progress"] == 0 and job["attempts"] == 0
    assert job["spec"]["sparsity"] == 0.5 and job["spec"]["method"] == "woodfisher"
    assert job["spec"]["fisher"]["lambda"] == 0.1  # stored by alias, the way the spec reads (relative α)
    assert job["spec"]["fisher"]["lambda_scale"] == "relative"
    assert "idempotency_key" not in job and "task_id" not in job
    assert server.queue.queues_of(job["id"]) == ["cpu"]
    got = client.get(resp.headers["location"])
    assert got.status_code == 200 and got.json()["id"] == job["id"]
    assert int(got.headers["retry-after"]) > 0


def test_cuda_jobs_go_to_the_gpu_queue(server, client, inputs):
    job = client.post("/v1/jobs", json=_body(inputs, device="cuda")).json()
    assert job["queue"] == "gpu" and server.queue.queues_of(job["id"]) == ["gpu"]


def test_idempotency_key(server, client, inputs):
    headers = {"Idempotency-Key": "abc-123"}
    first = client.post("/v1/jobs", json=_body(inputs), headers=headers)
    again = client.post("/v1/jobs", json=_body(inputs), headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert server.queue.queues_of(first.json()["id"]) == ["cpu"]  # enqueued once
    # explicit defaults are the same request
    same = client.post("/v1/jobs", json=_body(inputs, mode="one_shot"), headers=headers)
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
    different = client.post("/v1/jobs", json=_body(inputs, sparsity=0.9), headers=headers)
    assert_problem(different, 422, "idempotency-key-reused")
    # no key → a new job each time
    assert client.post("/v1/jobs", json=_body(inputs)).json()["id"] != first.json()["id"]


def test_invalid_spec_is_422_with_field_errors(client, inputs):
    body = assert_problem(
        client.post("/v1/jobs", json=_body(inputs, sparsity=1.5, method="nope")), 422, "validation-error"
    )
    locs = {tuple(e["loc"]) for e in body["errors"]}
    assert ("body", "spec", "sparsity") in locs and ("body", "spec", "method") in locs
    assert all({"loc", "msg", "type"} <= set(e) for e in body["errors"])
    body = assert_problem(client.post("/v1/jobs", json=_body(inputs, mode="gradual", finetune={"epochs": 0})), 422)
    assert any("finetune.epochs" in e["msg"] for e in body["errors"])  # no epochs given: end_epoch + 2 (#13)
    assert_problem(client.post("/v1/jobs", json={**_body(inputs), "extra": 1}), 422)
    assert_problem(client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}), 422)


def test_unknown_inputs_are_422(client, inputs):
    body = assert_problem(client.post("/v1/jobs", json={**_body(inputs), "model_id": "mdl_nope"}), 422, "invalid-input")
    assert body["errors"][0]["loc"] == ["body", "model_id"]


def test_content_type_and_size_limits(server, client, inputs):
    import json

    raw = json.dumps(_body(inputs)).encode()
    assert_problem(
        client.post("/v1/jobs", content=raw, headers={"Content-Type": "text/plain"}), 415, "unsupported-media-type"
    )
    assert_problem(client.post("/v1/jobs", content=raw), 415)
    huge = json.dumps({**_body(inputs), "pad": "x" * server.settings.max_json_bytes}).encode()
    assert_problem(
        client.post("/v1/jobs", content=huge, headers={"Content-Type": "application/json"}), 413, "too-large"
    )
    # chunked (no Content-Length): capped while reading
    chunks = iter([huge[i : i + 4096] for i in range(0, len(huge), 4096)])
    assert_problem(client.post("/v1/jobs", content=chunks, headers={"Content-Type": "application/json"}), 413)
    ok = client.post("/v1/jobs", content=raw, headers={"Content-Type": "application/merge-patch+json"})
    assert ok.status_code == 202


def test_list_pagination_and_state_filter(server, account, client, inputs):
    ids = [client.post("/v1/jobs", json=_body(inputs)).json()["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    client.post(f"/v1/jobs/{ids[1]}/cancel")

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/jobs", params=params).json()
        assert page["count"] == 5 and len(page["data"]) <= 2
        seen += [j["id"] for j in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and sorted(seen) == sorted(ids) and len(set(seen)) == 5
    assert seen == sorted(ids, reverse=True)  # newest first

    canceled = client.get("/v1/jobs", params={"state": "canceled"}).json()
    assert canceled["count"] == 2 and {j["id"] for j in canceled["data"]} == {ids[0], ids[1]}
    queued = client.get("/v1/jobs", params={"state": "queued", "limit": 200}).json()
    assert queued["count"] == 3
    assert_problem(client.get("/v1/jobs", params={"state": "bogus"}), 422)
    assert_problem(client.get("/v1/jobs", params={"cursor": "!!!"}), 422)
    assert_problem(client.get("/v1/jobs", params={"limit": 0}), 422)


def test_cancel_and_retry_transitions(server, account, client, inputs):
    job = client.post("/v1/jobs", json=_body(inputs)).json()
    jid = job["id"]
    # queued → canceled at once; the task is revoked
    canceled = client.post(f"/v1/jobs/{jid}/cancel")
    assert canceled.status_code == 200 and canceled.json()["state"] == "canceled"
    assert canceled.json()["cancel_requested"] is True and canceled.json()["finished_at"]
    assert any(t.startswith(f"task-{jid}") for t in server.queue.revoked)
    assert client.post(f"/v1/jobs/{jid}/cancel").json()["state"] == "canceled"  # idempotent

    # canceled → queued again, re-enqueued
    retried = client.post(f"/v1/jobs/{jid}/retry")
    assert retried.status_code == 202 and retried.json()["state"] == "queued"
    assert retried.headers["location"] == f"/v1/jobs/{jid}"
    assert retried.json()["cancel_requested"] is False and retried.json()["finished_at"] is None
    assert server.queue.queues_of(jid) == ["cpu", "cpu"]
    assert_problem(client.post(f"/v1/jobs/{jid}/retry"), 409, "conflict")  # queued: nothing to retry

    # running → canceling (the worker stops), then the worker finishes it as canceled
    with server.session() as s:
        assert attempts.claim(session=s, job_id=jid, task_id="t1").state is JobState.RUNNING
    assert client.post(f"/v1/jobs/{jid}/cancel").json()["state"] == "canceling"
    with server.session() as s:
        assert attempts.heartbeat(session=s, job_id=jid, attempt=1) == (True, True)  # owned, cancel requested
        assert attempts.finish(session=s, job_id=jid, attempt=1, state=JobState.CANCELED)
    assert client.get(f"/v1/jobs/{jid}").json()["state"] == "canceled"

    # failed → retry; succeeded → cancel/retry conflict
    with server.session() as s:
        jobs.retry(session=s, tenant=account.tenant, job_id=jid)
        attempts.claim(session=s, job_id=jid)
        attempts.finish(
            session=s,
            job_id=jid,
            attempt=2,
            state=JobState.FAILED,
            error={"type": "https://arborist.dev/problems/x", "title": "X", "status": 422},
        )
    failed = client.get(f"/v1/jobs/{jid}")
    assert failed.json()["state"] == "failed" and failed.json()["error"]["title"] == "X"
    assert "retry-after" not in failed.headers
    assert client.post(f"/v1/jobs/{jid}/retry").json()["error"] is None
    with server.session() as s:
        attempts.claim(session=s, job_id=jid)
        attempts.finish(session=s, job_id=jid, attempt=3, state=JobState.SUCCEEDED)
    done = client.get(f"/v1/jobs/{jid}").json()
    assert done["state"] == "succeeded" and done["progress"] == 1.0 and done["attempts"] == 3
    assert_problem(client.post(f"/v1/jobs/{jid}/cancel"), 409)
    assert_problem(client.post(f"/v1/jobs/{jid}/retry"), 409)


def test_enqueue_failure_is_503_and_the_job_fails(server, client, inputs):
    server.queue.fail = True
    try:
        resp = client.post("/v1/jobs", json=_body(inputs))
    finally:
        server.queue.fail = False
    assert_problem(resp, 503, "service-unavailable")
    jobs = client.get("/v1/jobs").json()["data"]
    assert len(jobs) == 1 and jobs[0]["state"] == "failed"
    assert jobs[0]["error"]["type"].endswith("/service-unavailable")
    assert client.post(f"/v1/jobs/{jobs[0]['id']}/retry").json()["state"] == "queued"


def test_concurrent_requests_with_one_idempotency_key_make_one_job(server, account, inputs):
    from concurrent.futures import ThreadPoolExecutor

    clients = [server.client(account.key) for _ in range(6)]
    headers = {"Idempotency-Key": "race"}
    with ThreadPoolExecutor(len(clients)) as pool:
        responses = list(pool.map(lambda c: c.post("/v1/jobs", json=_body(inputs), headers=headers), clients))
    assert sorted(r.status_code for r in responses) == [200] * 5 + [202], [r.text for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1 and server.queue.queues_of(ids.pop()) == ["cpu"]


def test_status_has_durations_phase_and_queue_position(server, account, client, inputs):
    first = client.post("/v1/jobs", json=_body(inputs)).json()
    second = client.post("/v1/jobs", json=_body(inputs)).json()
    # in the queue: a position (1 + queued jobs of its queue created before it), waiting time, no run yet
    assert first["queue_position"] >= 1 and second["queue_position"] == first["queue_position"] + 1
    assert first["queued_seconds"] >= 0 and first["running_seconds"] is None and first["phase"] is None
    polled = client.get(f"/v1/jobs/{second['id']}").json()  # the status poll's own path (a bare connection)
    assert polled["queue_position"] == second["queue_position"] and polled["queued_seconds"] >= 0
    listed = {j["id"]: j for j in client.get("/v1/jobs", params={"state": "queued"}).json()["data"]}
    assert listed[second["id"]]["queue_position"] == second["queue_position"]

    # the first one starts: no position; the one behind it moves up; the worker's progress message is the phase
    with server.session() as s:
        assert attempts.claim(session=s, job_id=first["id"]).state is JobState.RUNNING
        attempts.write_progress(session=s, job_id=first["id"], attempt=1, progress=0.3, message="pruning to 50.0%")
    running = client.get(f"/v1/jobs/{first['id']}").json()
    assert running["queue_position"] is None and running["phase"] == "pruning to 50.0%"
    assert running["running_seconds"] >= 0 and running["queued_seconds"] >= 0
    assert client.get(f"/v1/jobs/{second['id']}").json()["queue_position"] == second["queue_position"] - 1

    # finished: both durations are fixed by its timestamps, no phase
    with server.session() as s:
        assert attempts.finish(session=s, job_id=first["id"], attempt=1, state=JobState.SUCCEEDED)
    done = client.get(f"/v1/jobs/{first['id']}").json()
    created, started, finished = (_at(done[k]) for k in ("created_at", "started_at", "finished_at"))
    assert done["queued_seconds"] == pytest.approx((started - created).total_seconds(), abs=2e-3)
    assert done["running_seconds"] == pytest.approx((finished - started).total_seconds(), abs=2e-3)
    assert done["phase"] is None and done["queue_position"] is None
    assert client.post(f"/v1/jobs/{second['id']}/cancel").json()["queue_position"] is None

    # documented in the OpenAPI schema
    props = client.get("/openapi.json").json()["components"]["schemas"]["JobPublic"]["properties"]
    for name in ("queued_seconds", "running_seconds", "phase", "queue_position"):
        assert props[name].get("description"), name


def _at(value: str):
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00"))
