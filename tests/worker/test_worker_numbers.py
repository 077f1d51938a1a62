"""Issue #12 in the worker (``worker.runner`` without a broker, on SQLite and PostgreSQL): a run that goes
non-finite ends ``failed`` with the ``numerical-error`` problem (not ``succeeded`` with NaN weights, not
``internal-error``), everything it wrote is strict JSON, and the server's memory budget applies to every job, in
the run too."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from conftest import World
from core.service.db import jobs, outputs
from core.service.db.tables import JobState
from worker.runner import run_job

PROBLEMS = "https://arborist.dev/problems/"
#: within every range, but w ← w − lr·(g + wd·w) multiplies the weights by −9 per step: overflow in an epoch
DIVERGES = {
    "sparsity": 0.5,
    "fisher": {"samples": 64, "lambda": 1e-3},
    "finetune": {"epochs": 2, "lr": 10, "weight_decay": 1},
    "device": "cpu",
}


def _strict(value: Any) -> None:
    json.dumps(value, allow_nan=False)  # raises on NaN/Infinity


@pytest.fixture(params=["sqlite", "postgresql"])
def any_world(request, world_factory: Callable[..., World], pg_schema_url: Callable[..., str]) -> Callable[..., World]:
    def make(**settings: Any) -> World:
        return world_factory(pg_schema_url() if request.param == "postgresql" else None, **settings)

    return make


def test_a_run_that_goes_non_finite_fails_with_the_numerical_error_problem(any_world) -> None:
    world = any_world()
    job_id = world.job(DIVERGES)
    assert run_job(job_id, world.settings, worker="test@host:1") == "failed"
    job = world.get(job_id)
    assert job.state is JobState.FAILED and job.result is None
    assert job.error["type"] == PROBLEMS + "numerical-error" and job.error["status"] == 422, job.error
    assert "fine-tuning epoch 1/2" in job.error["detail"] and "lower finetune.lr" in job.error["detail"]
    assert "layers.1.weight" in job.error["detail"]
    _strict(job.error)
    with world.sessions() as s:
        assert outputs.list_artifacts(session=s, job_id=job_id) == []
        metrics = outputs.list_metrics(session=s, job_id=job_id)
    assert [m.kind for m in metrics] == ["dense", "prune"]  # no point for the epoch that went non-finite
    for _kind, data in world.events(job_id):
        _strict(data)
    assert world.store.exists(f"checkpoints/{job_id}/latest.json")  # the pruning step's, a retry's starting point


def test_a_stored_spec_with_an_overflowing_lambda_fails_as_invalid_input(any_world) -> None:
    """A spec stored before the ranges existed (λ = 1e300 ran to "succeeded" with NaN weights) is refused."""
    world = any_world()
    spec = {**DIVERGES, "fisher": {"samples": 64, "lambda": 1e300}, "finetune": {"epochs": 0}}
    with world.sessions() as s:
        job, _ = jobs.create(
            session=s, tenant=world.tenant, model_id=world.model_id, dataset_id=world.dataset_id, spec=spec
        )
    assert run_job(job.id, world.settings, worker="test@host:1") == "failed"
    error = world.get(job.id).error
    assert error["type"] == PROBLEMS + "invalid-input" and "no longer valid" in error["detail"]
    assert ["spec", "fisher", "lambda"] in [e["loc"] for e in error["errors"]]


def test_the_servers_memory_budget_applies_to_a_spec_without_one(any_world) -> None:
    """ARBORIST_MEMORY_BUDGET_MB set, the spec without memory_budget_mb: the run checks its plan against the
    server's budget before any work (it used to run unchecked, and be OOM-killed)."""
    world = any_world(memory_budget_mb=0.5)
    job_id = world.job({"sparsity": 0.5, "fisher": {"samples": 64, "lambda": 1e-3}, "device": "cpu"})
    assert run_job(job_id, world.settings, worker="test@host:1") == "failed"
    error = world.get(job_id).error
    assert error["type"] == PROBLEMS + "memory-budget-exceeded" and error["status"] == 422
    assert "ARBORIST_MEMORY_BUDGET_MB" in error["detail"] and "0.5 MiB" in error["detail"]
    [numbers] = error["errors"]
    assert numbers["needed_bytes"] > numbers["budget_bytes"] == 2**19
    assert [k for k, _ in world.events(job_id) if k in ("started", "pruned")] == []  # refused before any work


def test_the_lower_of_the_spec_and_server_budgets_applies(world_factory: Callable[..., World]) -> None:
    world = world_factory(memory_budget_mb=1024)
    spec = {"sparsity": 0.5, "fisher": {"samples": 64, "lambda": 1e-3}, "device": "cpu", "memory_budget_mb": 0.5}
    job_id = world.job(spec)
    assert run_job(job_id, world.settings, worker="test@host:1") == "failed"
    error = world.get(job_id).error
    assert error["type"] == PROBLEMS + "memory-budget-exceeded" and "spec.memory_budget_mb" in error["detail"]
    ok = world.job({**spec, "memory_budget_mb": 512})
    assert run_job(ok, world.settings, worker="test@host:1") == "succeeded"
    started = [d for k, d in world.events(ok) if k == "started"]
    assert started and 0 < started[0]["memory_plan"]["total_bytes"] <= 512 * 2**20
