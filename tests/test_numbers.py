"""Issue #12, "Non-finite numbers", at the spec and run level (over HTTP: tests/api/test_api_bad_inputs_numbers.py;
in the worker: tests/worker/test_worker_numbers.py).

* Every float of the spec is finite and within a documented range, every int within what a run and both databases
  hold: the issue's examples (λ = 1e300, Infinity, NaN, 1e400, 1e-300; lambda_grid [1e400] or []; lr Infinity;
  seed 2**70; weight_decay 1e308) are field errors, located, and the JSON Schema says so.
* A run whose numbers go non-finite fails with a ``NumericalError`` that says which step and which layers, and
  what to change; it writes no artifacts. The issue's examples get past validation here only because the test
  builds the spec with ``model_copy`` (as an older stored spec or a direct caller could): the run's own guard is
  what is tested.
* Every JSON a run writes is strict JSON (no NaN/Infinity literals).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from core.engine.curvature.inverse import fisher_block_inverse
from core.errors import NumericalError, problem_from_error
from core.io.zoo import build_model
from core.runs.checkpoint import DirectoryCheckpointer
from core.runs.numerics import json_bytes, json_safe
from core.runs.run import RunHooks, execute
from core.runs.spec import PruneSpec

# R = 1 and the summed update (the defaults before #13): fast, and what the numerical checks below were written for
BASE = {
    "sparsity": 0.5,
    "fisher": {"samples": 64, "lambda": 1e-3, "recompute": 1, "update": "summed", "block_size": 128},
    "device": "cpu",
}


def _strict(text: str | bytes) -> Any:
    """json.loads that refuses NaN and ±Infinity, as strict JSON parsers (and PostgreSQL's JSON type) do."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-JSON number {token}")

    return json.loads(text, parse_constant=refuse)


def _with(section: str | None = None, **fields: Any) -> PruneSpec:
    """The base spec with fields set past validation (what an old stored spec or a direct caller could hand a run)."""
    spec = PruneSpec.model_validate(BASE)
    if section is None:
        return spec.model_copy(update=fields)
    return spec.model_copy(update={section: getattr(spec, section).model_copy(update=fields)})


def _mlp(digits_mlp_state: dict) -> torch.nn.Module:
    model = build_model("mlp", in_features=64, hidden=[32], num_classes=10)
    model.load_state_dict(digits_mlp_state)
    return model


class Recorder(RunHooks):
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        self.points: list[dict] = []

    def event(self, kind: str, data: dict) -> None:
        self.events.append((kind, data))

    def metric(self, point: dict) -> None:
        self.points.append(point)


# --- the spec --------------------------------------------------------------------------------------------------

REFUSED = [
    ({"fisher": {"lambda": 1e300}}, ("fisher", "lambda"), "lambda must be at most 1e12"),
    ({"fisher": {"lambda": math.inf}}, ("fisher", "lambda"), "lambda must be finite"),
    ({"fisher": {"lambda": -math.inf}}, ("fisher", "lambda"), "lambda must be finite"),
    ({"fisher": {"lambda": math.nan}}, ("fisher", "lambda"), "lambda must be finite"),
    ({"fisher": {"lambda": 1e-300}}, ("fisher", "lambda"), "lambda must be at least 1e-12"),
    ({"fisher": {"lambda": 10**400}}, ("fisher", "lambda"), "lambda must be at most 1e12"),
    ({"fisher": {"lambda": "auto", "lambda_grid": [math.inf]}}, ("fisher", "lambda_grid", 0), "lambda_grid must"),
    ({"fisher": {"lambda": "auto", "lambda_grid": [1e-3, 1e300]}}, ("fisher", "lambda_grid", 1), "at most 1e12"),
    ({"fisher": {"lambda": "auto", "lambda_grid": []}}, ("fisher", "lambda_grid"), "at least 1 item"),
    ({"fisher": {"lambda_grid": [0.1] * 33}}, ("fisher", "lambda_grid"), "at most 32 items"),
    ({"fisher": {"block_size": 2**70}}, ("fisher", "block_size"), "block_size must be ≥ 1"),
    ({"finetune": {"lr": math.inf}}, ("finetune", "lr"), "finite number"),
    ({"finetune": {"lr": 1e6}}, ("finetune", "lr"), "less than or equal to 10"),
    ({"finetune": {"weight_decay": 1e308}}, ("finetune", "weight_decay"), "less than or equal to 1"),
    ({"finetune": {"momentum": math.nan}}, ("finetune", "momentum"), "finite number"),
    ({"finetune": {"epochs": 2**70}}, ("finetune", "epochs"), "less than or equal to 10000"),
    ({"schedule": {"exponent": math.inf}}, ("schedule", "exponent"), "finite number"),
    ({"schedule": {"end_epoch": 2**63}}, ("schedule", "end_epoch"), "less than or equal to 10000"),
    ({"seed": 2**70}, ("seed",), "less than or equal to 4294967295"),
    ({"seed": 2**32}, ("seed",), "less than or equal to 4294967295"),
    ({"sparsity": math.nan}, ("sparsity",), "finite number"),
    ({"val_fraction": math.inf}, ("val_fraction",), "finite number"),
    ({"memory_budget_mb": math.inf}, ("memory_budget_mb",), "finite number"),
    ({"memory_budget_mb": 1e300}, ("memory_budget_mb",), "less than or equal to"),
]


@pytest.mark.parametrize("change,loc,message", REFUSED, ids=[str(c)[:48] for c, _, _ in REFUSED])
def test_non_finite_and_out_of_range_numbers_are_field_errors(change: dict, loc: tuple, message: str) -> None:
    body = {**BASE, **change, "fisher": {**BASE["fisher"], **change.get("fisher", {})}}
    with pytest.raises(ValidationError) as err:
        PruneSpec.model_validate(body)
    [error] = err.value.errors()
    assert tuple(error["loc"]) == loc
    assert message in error["msg"], error["msg"]


def test_json_literals_that_parse_to_non_finite_floats_are_refused() -> None:
    for text in ('{"lambda": Infinity}', '{"lambda": NaN}', '{"lambda": 1e400}', '{"lambda": -1e400}'):
        body = {**BASE, "fisher": json.loads(text)}
        with pytest.raises(ValidationError, match="lambda must be finite"):
            PruneSpec.model_validate(body)
    with pytest.raises(ValidationError, match="lambda_grid must hold positive values"):
        PruneSpec.model_validate({**BASE, "fisher": json.loads('{"lambda": "auto", "lambda_grid": [1e400]}')})


def test_the_ranges_edges_are_accepted_and_read_back_unchanged() -> None:
    spec = PruneSpec.model_validate(
        {
            "sparsity": 0.5,
            "fisher": {"lambda": 1e12, "lambda_grid": [1e-12, 1e12], "block_size": 2**31 - 1},
            "finetune": {"lr": 10, "weight_decay": 1, "epochs": 10_000},
            "schedule": {"exponent": 10},
            "seed": 2**32 - 1,
            "memory_budget_mb": 2**30,
        }
    )
    dumped = _strict(spec.model_dump_json(by_alias=True))
    assert dumped["fisher"]["lambda"] == 1e12 and dumped["fisher"]["lambda_grid"] == [1e-12, 1e12]
    assert dumped["seed"] == 2**32 - 1
    torch.Generator().manual_seed(spec.seed * 7919 + spec.finetune.epochs)  # the run's largest seed fits torch's


def test_the_json_schema_states_the_ranges() -> None:
    defs = PruneSpec.model_json_schema(by_alias=True)["$defs"]
    fisher = defs["FisherSpec"]["properties"]
    grid = next(s for s in fisher["lambda_grid"]["anyOf"] if s.get("type") == "array")  # or null: the default grid
    assert grid["minItems"] == 1 and grid["maxItems"] == 32
    assert grid["items"] == {"maximum": 1e12, "minimum": 1e-12, "type": "number"}
    assert {"maximum": 1e12, "minimum": 1e-12, "type": "number"} in fisher["lambda"]["anyOf"]
    finetune = defs["FinetuneSpec"]["properties"]
    assert finetune["lr"]["maximum"] == 10 and finetune["weight_decay"]["maximum"] == 1
    assert PruneSpec.model_json_schema()["properties"]["seed"]["maximum"] == 2**32 - 1


# --- runs that go non-finite -----------------------------------------------------------------------------------


def _fails_numerically(spec: PruneSpec, digits, state: dict, tmp_path: Path) -> tuple[NumericalError, Recorder]:
    hooks = Recorder()
    with pytest.raises(NumericalError) as err:
        execute(spec, _mlp(state), digits, tmp_path / "out", hooks, DirectoryCheckpointer(tmp_path / "ck"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "a failed run left artifacts"
    problem = problem_from_error(err.value)
    assert problem["type"].endswith("/numerical-error") and problem["status"] == 422
    _strict(json.dumps(problem))
    for _, data in hooks.events:
        _strict(json.dumps(data))
    assert all(math.isfinite(p["loss"]) and math.isfinite(p["metric"]) for p in hooks.points)
    return err.value, hooks


@pytest.mark.parametrize("lam", [1e300, math.inf])
def test_a_lambda_that_overflows_fails_the_pruning_step(lam, digits, digits_mlp_state, tmp_path) -> None:
    err, _ = _fails_numerically(_with("fisher", damping=lam), digits, digits_mlp_state, tmp_path)
    assert "pruning step 1 (epoch 0" in err.detail and "made the weights non-finite" in err.detail
    assert "layers.1.weight" in err.detail and "fisher.lambda" in err.detail
    assert {tuple(e["loc"]) for e in err.errors} >= {("weights", "layers.1.weight")}


def test_a_tiny_lambda_that_breaks_the_factorization_asks_for_a_larger_one(digits, digits_mlp_state, tmp_path) -> None:
    err, _ = _fails_numerically(_with("fisher", damping=1e-300), digits, digits_mlp_state, tmp_path)
    assert "pruning step 1" in err.detail and "failed to factor the curvature" in err.detail
    assert "use a larger fisher.lambda" in err.detail
    assert err.errors[0]["loc"] == ["spec", "fisher", "lambda"]


def test_an_infinite_learning_rate_fails_the_fine_tuning_epoch(digits, digits_mlp_state, tmp_path) -> None:
    spec = _with("finetune", lr=math.inf, epochs=2)
    err, hooks = _fails_numerically(spec, digits, digits_mlp_state, tmp_path)
    assert "fine-tuning epoch 1/2" in err.detail and "lower finetune.lr" in err.detail
    assert [k for k, _ in hooks.events].count("checkpoint") == 1  # the pruning step's; never a NaN one


def test_a_valid_spec_that_diverges_fails_instead_of_succeeding(digits, digits_mlp_state, tmp_path) -> None:
    """In range, but w ← w − lr·(g + wd·w) multiplies the weights by −9 per step: overflow within an epoch."""
    spec = PruneSpec.model_validate({**BASE, "finetune": {"epochs": 2, "lr": 10, "weight_decay": 1}})
    err, _ = _fails_numerically(spec, digits, digits_mlp_state, tmp_path)
    assert "fine-tuning epoch 1/2" in err.detail and "non-finite" in err.detail


def test_a_model_whose_outputs_overflow_fails_before_pruning(digits, digits_mlp_state, tmp_path) -> None:
    state = {k: v * 1e30 if k.endswith("weight") else v for k, v in digits_mlp_state.items()}  # finite weights
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    err, _ = _fails_numerically(PruneSpec.model_validate(BASE), digits, state, tmp_path)
    assert "before any pruning" in err.detail and "overflow" in err.detail


def test_every_lambda_of_the_sweep_non_finite_fails(digits, digits_mlp_state, tmp_path) -> None:
    spec = _with("fisher", damping="auto", lambda_grid=[1e300, math.inf])
    err, _ = _fails_numerically(spec, digits, digits_mlp_state, tmp_path)
    assert "every λ of fisher.lambda_grid" in err.detail


def test_a_non_finite_lambda_of_the_sweep_is_skipped_and_the_report_is_strict_json(
    digits, digits_mlp_state, tmp_path
) -> None:
    spec = _with("fisher", damping="auto", lambda_grid=[math.inf, 1e-3])
    hooks = Recorder()
    result = execute(spec, _mlp(digits_mlp_state), digits, tmp_path / "out", hooks)
    report = _strict(result.artifacts["report"].read_text())
    bad, good, *widened = report["lambda_sweep"]  # 1e-3 wins on the grid's lower edge: 1e-4, 1e-5 tried too
    assert bad["accuracy"] is None and "non-finite" in bad["error"] and good["error"] is None
    assert all(w["widened"] and w["error"] is None for w in widened) and widened
    assert report["lambda"] == min(report["lambda_sweep"][1:], key=lambda s: s["loss"])["lambda"]  # lowest cal loss
    assert report["spec"]["fisher"]["lambda_grid"] == [None, 1e-3]  # the non-finite value written as null
    [(_, chosen)] = [(k, d) for k, d in hooks.events if k == "lambda_chosen"]
    _strict(json.dumps(chosen))


def test_fisher_block_factorization_failure_in_float64_is_a_numerical_error() -> None:
    g = torch.full((1, 2, 4), 1e8, dtype=torch.float64)  # rank-1 GᵀG of 2e16: λ = 1e-12 is lost in rounding
    with pytest.raises(NumericalError, match="not positive definite even in float64"):
        fisher_block_inverse(g, 1e-12)


def test_json_safe_writes_strict_json() -> None:
    value = {"a": math.nan, "b": [math.inf, -math.inf, 1.5, (2.0, math.nan)], "c": {"d": 1, "e": "x"}}
    assert json_safe(value) == {"a": None, "b": [None, None, 1.5, [2.0, None]], "c": {"d": 1, "e": "x"}}
    assert _strict(json_bytes(value)) == json_safe(value)
