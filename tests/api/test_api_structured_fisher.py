"""A structured woodfisher job over HTTP: its memory plan at ``POST /v1/jobs/plan`` and its refusals (422)."""

from __future__ import annotations

from _api_testkit import assert_problem


def test_structured_woodfisher_plan_and_refusals(client, seed) -> None:
    model_id, dataset_id = seed()
    ids = {"model_id": model_id, "dataset_id": dataset_id}
    spec = {"sparsity": 0.5, "structure": "neurons", "fisher": {"samples": 64}}
    r = client.post("/v1/jobs/plan", json={**ids, "spec": spec})
    assert r.status_code == 200, r.text
    plan = r.json()["memory_plan"]  # the MLP's one family: 32 hidden units, consumer layers.3 (10 × 32), whole rows
    assert "layers.3.weight: c = 32" in plan["block_choice"] and plan["total_bytes"] >= 10 * 32 * 32 * 8
    r = client.post("/v1/jobs/plan", json={**ids, "spec": {**spec, "structure_allocation": "global"}})
    assert r.status_code == 200, r.text  # a zoo model takes per-layer widths
    assert_problem(
        client.post("/v1/jobs/plan", json={**ids, "spec": {"sparsity": 0.5, "structure_allocation": "global"}}), 422
    )
    tiny = {**spec, "fisher": {"samples": 64, "block_size": "layer"}, "memory_budget_mb": 0.5}
    assert_problem(client.post("/v1/jobs/plan", json={**ids, "spec": tiny}), 422, "memory-budget-exceeded")
    assert_problem(client.post("/v1/jobs", json={**ids, "spec": tiny}), 422, "memory-budget-exceeded")
    assert client.get("/v1/jobs").json()["count"] == 0
