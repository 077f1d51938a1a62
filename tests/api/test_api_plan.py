"""``POST /v1/jobs/plan``: the checks of job creation and the memory plan, with no job created."""

from __future__ import annotations

from _api_testkit import assert_problem


def test_plan_of_a_job_that_fits_creates_nothing(server, client, seed) -> None:
    model_id, dataset_id = seed()
    body = {"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.8, "fisher": {"block_size": 32}}}
    r = client.post("/v1/jobs/plan", json=body)
    assert r.status_code == 200, r.text
    plan = r.json()["memory_plan"]
    assert plan["block_size"] == 32
    assert plan["total_bytes"] == plan["gradient_bytes"] + plan["inverse_bytes"] + plan["working_bytes"] > 0
    # the plan's inverse: one c × c block per 32 weights of the MLP's 64·32 + 32·10 weights, float32
    assert plan["inverse_bytes"] == (64 * 32 + 32 * 10) // 32 * 32 * 32 * 4
    assert r.json()["budget_mb"] is None
    assert client.get("/v1/jobs").json()["count"] == 0


def test_plan_against_a_budget_and_for_a_method_without_one(client, seed) -> None:
    model_id, dataset_id = seed()
    spec = {"sparsity": 0.8, "memory_budget_mb": 64}
    r = client.post("/v1/jobs/plan", json={"model_id": model_id, "dataset_id": dataset_id, "spec": spec})
    assert r.status_code == 200 and r.json()["budget_mb"] == 64
    assert r.json()["budget_source"] == "spec.memory_budget_mb"
    spec = {"sparsity": 0.8, "method": "magnitude"}
    r = client.post("/v1/jobs/plan", json={"model_id": model_id, "dataset_id": dataset_id, "spec": spec})
    assert r.status_code == 200 and r.json()["memory_plan"] is None


def test_plan_refuses_what_creation_refuses_at_the_same_fields(client, seed) -> None:
    model_id, dataset_id = seed()
    too_many = {"sparsity": 0.8, "fisher": {"samples": 5000}}
    r = client.post("/v1/jobs/plan", json={"model_id": model_id, "dataset_id": dataset_id, "spec": too_many})
    body = assert_problem(r, 422)
    assert [e["loc"] for e in body["errors"]] == [["body", "spec", "fisher", "samples"]]
    created = client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": too_many})
    assert assert_problem(created, 422)["errors"] == body["errors"]
    tiny = {"sparsity": 0.8, "memory_budget_mb": 0.001}
    r = client.post("/v1/jobs/plan", json={"model_id": model_id, "dataset_id": dataset_id, "spec": tiny})
    assert_problem(r, 422, "memory-budget-exceeded")
    bad = {"sparsity": 1.5, "fisher": {"recompute": 1000}}
    r = client.post("/v1/jobs/plan", json={"model_id": model_id, "dataset_id": dataset_id, "spec": bad})
    locs = {tuple(e["loc"]) for e in assert_problem(r, 422)["errors"]}
    assert {("body", "spec", "sparsity"), ("body", "spec", "fisher", "recompute")} <= locs


def test_plan_sees_only_the_tenants_own_inputs(client, seed, make_account) -> None:
    other = make_account()
    model_id, dataset_id = seed(other.tenant)
    r = client.post("/v1/jobs/plan", json={"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}})
    assert_problem(r, 404)
    assert (
        other.client.post(
            "/v1/jobs/plan", json={"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}}
        ).status_code
        == 200
    )
    assert_problem(client.post("/v1/jobs/plan", json={"spec": {"sparsity": 0.5}}), 422)
    r = client.post("/v1/jobs/plan", content=b"{}", headers={"Content-Type": "text/plain"})
    assert_problem(r, 415)
