"""Issue #12 over HTTP, on SQLite and PostgreSQL (the ``server`` fixture: a real uvicorn on a real database):
non-finite and out-of-range numbers in a job's spec, and memory plans over the server's budget, are refused at job
creation with a located RFC 9457 problem, and nothing is created or enqueued.

The bodies are sent as raw JSON text, so that the literals are exactly the issue's: ``Infinity``, ``NaN``,
``1e400`` (which Python's JSON parser reads as ``inf``), ``2**70`` written out. Before the fix these were 202
(``lambda: 1e300``, ``Infinity``, ``lambda_grid: [1e400]`` and ``lr: Infinity`` then ran to "succeeded" with NaN
weights; ``seed: 2**70``, ``weight_decay: 1e308`` and ``lambda: 1e-300`` to internal-error; ``lambda: 1e400`` read
back as null; SQLite and PostgreSQL did not even agree on ``Infinity``).
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from _api_testkit import assert_problem
from core.service.db import inputs as input_rows
from core.service.db.tables import Job

VALIDATION = "validation-error"

CASES = [
    # (id, spec as JSON text, the field error's loc under body.spec, a regex its message matches)
    ("lambda-1e300", '{"sparsity": 0.5, "fisher": {"lambda": 1e300}}', ("fisher", "lambda"), r"at most 1e12"),
    ("lambda-Infinity", '{"sparsity": 0.5, "fisher": {"lambda": Infinity}}', ("fisher", "lambda"), r"finite"),
    ("lambda--Infinity", '{"sparsity": 0.5, "fisher": {"lambda": -Infinity}}', ("fisher", "lambda"), r"finite"),
    ("lambda-NaN", '{"sparsity": 0.5, "fisher": {"lambda": NaN}}', ("fisher", "lambda"), r"finite"),
    ("lambda-1e400", '{"sparsity": 0.5, "fisher": {"lambda": 1e400}}', ("fisher", "lambda"), r"finite"),
    ("lambda-1e-300", '{"sparsity": 0.5, "fisher": {"lambda": 1e-300}}', ("fisher", "lambda"), r"at least 1e-12"),
    (
        "lambda_grid-1e400",
        '{"sparsity": 0.5, "fisher": {"lambda": "auto", "lambda_grid": [1e400]}}',
        ("fisher", "lambda_grid", 0),
        r"lambda_grid must hold positive values",
    ),
    (
        "lambda_grid-empty",
        '{"sparsity": 0.5, "fisher": {"lambda": "auto", "lambda_grid": []}}',
        ("fisher", "lambda_grid"),
        r"at least 1 item",
    ),
    ("lr-Infinity", '{"sparsity": 0.5, "finetune": {"lr": Infinity}}', ("finetune", "lr"), r"finite number"),
    ("seed-2**70", f'{{"sparsity": 0.5, "seed": {2**70}}}', ("seed",), r"less than or equal to 4294967295"),
    (
        "weight_decay-1e308",
        '{"sparsity": 0.5, "finetune": {"weight_decay": 1e308}}',
        ("finetune", "weight_decay"),
        r"less than or equal to 1",
    ),
    ("momentum-NaN", '{"sparsity": 0.5, "finetune": {"momentum": NaN}}', ("finetune", "momentum"), r"finite"),
    ("exponent-Infinity", '{"sparsity": 0.5, "schedule": {"exponent": Infinity}}', ("schedule", "exponent"), r"finite"),
    ("sparsity-NaN", '{"sparsity": NaN}', ("sparsity",), r"finite"),
    ("memory_budget_mb-1e400", '{"sparsity": 0.5, "memory_budget_mb": 1e400}', ("memory_budget_mb",), r"finite"),
    ("block_size-2**70", f'{{"sparsity": 0.5, "fisher": {{"block_size": {2**70}}}}}', ("fisher", "block_size"), r""),
]


@pytest.fixture
def rows(seed) -> tuple[str, str]:
    return seed()


def _post(client: httpx.Client, rows: tuple[str, str], spec_text: str) -> httpx.Response:
    model_id, dataset_id = rows
    body = f'{{"model_id": {json.dumps(model_id)}, "dataset_id": {json.dumps(dataset_id)}, "spec": {spec_text}}}'
    return client.post("/v1/jobs", content=body.encode(), headers={"Content-Type": "application/json"})


def _jobs(server, tenant_id: str) -> int:
    with server.session() as s:
        return s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id))


def _refused(server, account, rows, spec_text: str, status: int, slug: str) -> dict[str, Any]:
    before, enqueued = _jobs(server, account.tenant.id), len(server.queue.enqueued)
    body = assert_problem(_post(account.client, rows, spec_text), status, slug)
    assert _jobs(server, account.tenant.id) == before and len(server.queue.enqueued) == enqueued
    json.dumps(body, allow_nan=False)  # the problem itself is strict JSON
    return body


def _model_row(server, account, hidden: list[int]) -> str:
    """A zoo MLP's row (no file: job creation reads only the row) of 64 inputs, ``hidden`` and 10 outputs."""
    widths = [64, *hidden, 10]
    with server.session() as s:
        return input_rows.create_model(
            session=s,
            tenant=account.tenant,
            name=f"mlp-{'-'.join(map(str, widths))}",
            format="safetensors",
            size=1,
            sha256="0" * 64,
            path=f"models/{account.tenant.id}/none.safetensors",
            arch="mlp",
            arch_kwargs={"in_features": 64, "hidden": hidden, "num_classes": 10},
            num_parameters=sum(a * b + b for a, b in itertools.pairwise(widths)),
        ).id


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_non_finite_and_out_of_range_numbers_are_422_with_the_field(server, account, rows, case) -> None:
    _, spec_text, loc, message = case
    body = _refused(server, account, rows, spec_text, 422, VALIDATION)
    errors = {tuple(e["loc"]): e["msg"] for e in body["errors"]}
    assert ("body", "spec", *loc) in errors, body
    assert re.search(message, errors["body", "spec", *loc]), errors


def test_the_ranges_edges_are_accepted_and_read_back(server, client, rows) -> None:
    spec = '{"sparsity": 0.5, "fisher": {"lambda": 1e12}, "seed": 4294967295, "finetune": {"weight_decay": 1}}'
    resp = _post(client, rows, spec)
    assert resp.status_code == 202, resp.text
    got = client.get(resp.headers["location"]).json()
    assert got["spec"]["fisher"]["lambda"] == 1e12 and got["spec"]["seed"] == 2**32 - 1
    assert got["spec"]["finetune"]["weight_decay"] == 1


def test_openapi_states_the_ranges(server) -> None:
    schemas = server.client().get("/openapi.json").json()["components"]["schemas"]
    fisher = next(v for k, v in schemas.items() if k.startswith("FisherSpec"))["properties"]
    grid = next(v for v in fisher["lambda_grid"]["anyOf"] if v.get("type") == "array")  # or null: the method's grid
    assert grid["minItems"] == 1 and grid["items"]["maximum"] == 1e12
    assert {"type": "number", "minimum": 1e-12, "maximum": 1e12} in fisher["lambda"]["anyOf"]
    finetune = next(v for k, v in schemas.items() if k.startswith("FinetuneSpec"))["properties"]
    assert finetune["lr"]["maximum"] == 10 and finetune["weight_decay"]["maximum"] == 1
    spec = next(v for k, v in schemas.items() if k.startswith("PruneSpec"))["properties"]
    assert spec["seed"]["maximum"] == 2**32 - 1


# --- the server's memory budget ----------------------------------------------------------------------------------


def test_the_servers_budget_applies_to_a_spec_without_one(server, account, rows, monkeypatch) -> None:
    """ARBORIST_MEMORY_BUDGET_MB set, no memory_budget_mb in the spec: the plan is checked anyway (it was not, and
    the job was OOM-killed three times, ending worker-lost)."""
    monkeypatch.setattr(server.settings, "memory_budget_mb", 0.5)
    body = _refused(server, account, rows, '{"sparsity": 0.5}', 422, "memory-budget-exceeded")
    assert "ARBORIST_MEMORY_BUDGET_MB" in body["detail"] and "the budget is 0.5 MiB" in body["detail"]
    [numbers] = body["errors"]
    assert numbers["loc"] == ["body", "spec", "fisher"]
    assert numbers["needed_bytes"] > numbers["budget_bytes"] == 2**19
    monkeypatch.setattr(server.settings, "memory_budget_mb", 64)
    assert _post(account.client, rows, '{"sparsity": 0.5}').status_code == 202  # the same job fits 64 MiB


def test_a_plan_of_many_gigabytes_is_refused_at_creation(server, account, rows, monkeypatch) -> None:
    monkeypatch.setattr(server.settings, "memory_budget_mb", 4096)
    big = _model_row(server, account, [8192, 8192])  # 67.7 M weights: 69 GB of Fisher gradients at m = 256
    body = _refused(server, account, (big, rows[1]), '{"sparsity": 0.5}', 422, "memory-budget-exceeded")
    [numbers] = body["errors"]
    assert numbers["needed_bytes"] > 10 * 2**30 and numbers["budget_bytes"] == 4096 * 2**20
    assert re.search(r"the run needs \d+\.\d MiB \(gradients", body["detail"])


def test_the_lower_of_the_spec_and_server_budgets_applies(server, account, rows, monkeypatch) -> None:
    monkeypatch.setattr(server.settings, "memory_budget_mb", 1024)
    body = _refused(server, account, rows, '{"sparsity": 0.5, "memory_budget_mb": 0.5}', 422, "memory-budget-exceeded")
    assert "spec.memory_budget_mb" in body["detail"]
    over = _refused(server, account, rows, '{"sparsity": 0.5, "memory_budget_mb": 2048}', 422, "invalid-input")
    assert over["errors"][0]["loc"] == ["body", "spec", "memory_budget_mb"]  # above the server's limit, as before


def test_exact_obs_over_its_weight_limit_is_refused_at_creation(server, account, rows) -> None:
    """It used to pass creation and fail in the run with an internal-error (a ValueError in the estimator)."""
    big = _model_row(server, account, [128])  # 64·128 + 128·10 = 9472 weights
    body = _refused(server, account, (big, rows[1]), '{"sparsity": 0.5, "method": "exact_obs"}', 422, "invalid-input")
    assert "exact_obs is for tiny models: 9472 weights selected, at most 5000" in body["detail"]
    assert body["errors"][0]["loc"] == ["body", "spec", "method"]
    assert _post(account.client, rows, '{"sparsity": 0.5, "method": "exact_obs"}').status_code == 202  # 2368 fit
