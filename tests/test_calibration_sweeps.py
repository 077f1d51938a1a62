"""λ and R chosen per job by one-shot sweeps on the calibration split (#13): ``recompute: "auto"``, kfac's and
diag_fisher's default λ sweep, and that neither sweep ever reads the validation split whose metric a job reports."""

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from core.engine.methods import METHODS, Method, method_info
from core.engine.pruner import make_pruner
from core.runs.run import Run, execute
from core.runs.spec import RECOMPUTE_GRID, PruneSpec
from core.runs.train import evaluate


def test_recompute_auto_is_validated_and_stored_as_given():
    spec = PruneSpec(method="kfac", sparsity=0.9, fisher={"recompute": "auto"})
    assert spec.fisher.recompute == "auto" and spec.calibrates
    again = PruneSpec.model_validate(spec.model_dump(mode="json", by_alias=True))
    assert again.fisher.recompute == "auto"  # a stored spec reads back the same
    assert PruneSpec(sparsity=0.9, fisher={"recompute": 3}).fisher.recompute == 3
    for bad in (0, 101, 2.5, "fast", True):
        with pytest.raises(ValueError, match="recompute must be an integer from 1 to 100, or 'auto'"):
            PruneSpec(sparsity=0.9, fisher={"recompute": bad})
    # a fixed λ and R hold nothing out; magnitude uses neither, so it sweeps nothing
    assert not PruneSpec(sparsity=0.9, fisher={"lambda": 1e-3, "recompute": 16}).calibrates
    assert not PruneSpec(method="magnitude", sparsity=0.9, fisher={"recompute": "auto"}).calibrates


@pytest.mark.parametrize("method", list(METHODS))
def test_the_r_grid_is_capped_by_the_methods_cost(method):
    grid = PruneSpec(method=method, sparsity=0.9, fisher={"recompute": "auto"}).recompute_grid()
    cap = method_info(method).recompute_sweep_max
    assert grid == [r for r in RECOMPUTE_GRID if r <= cap] and max(grid) <= cap
    assert 64 in PruneSpec(method="kfac", sparsity=0.9).recompute_grid()  # kfac's prune is cheap: up to 64
    assert max(PruneSpec(method="woodfisher", sparsity=0.9).recompute_grid()) == 16


@pytest.mark.parametrize("method", ["kfac", "diag_fisher"])
def test_kfac_and_diag_fisher_sweep_lambda_by_default_and_keep_an_explicit_one(method):
    info = method_info(method)
    spec = PruneSpec(method=method, sparsity=0.9)
    assert spec.fisher.damping == "auto" and spec.calibrates
    assert spec.fisher.lambda_scale == info.default_lambda_sweep
    mine = PruneSpec(method=method, sparsity=0.9, fisher={"lambda": 1e-3}).fisher
    assert (mine.damping, mine.lambda_scale) == (1e-3, "absolute")
    # a scale without a λ: the fixed default of that scale (no sweep)
    fixed = PruneSpec(method=method, sparsity=0.9, fisher={"lambda_scale": "absolute"}).fisher
    assert fixed.damping == info.default_lambda
    assert PruneSpec(method="woodfisher", sparsity=0.9).fisher.damping == 0.1  # woodfisher keeps its fixed α


@pytest.fixture
def quick_kfac(monkeypatch):
    """K-FAC with R 4 by default and an R grid of (1, 2, 4): the sweeps of the real grid (64 sub-steps per λ) take
    minutes on a loaded machine; what is tested does not depend on the values."""
    import core.runs.spec as spec_module

    info = dataclasses.replace(METHODS[Method.KFAC], default_recompute=4)
    monkeypatch.setitem(METHODS, Method.KFAC, info)
    monkeypatch.setattr(spec_module, "RECOMPUTE_GRID", [1, 2, 4])


def _spec(**fisher) -> PruneSpec:
    return PruneSpec(method="kfac", sparsity=0.7, seed=3, fisher={"samples": 32, **fisher})


def test_the_sweeps_never_read_the_validation_split(quick_kfac, digits, digits_mlp, tmp_path):
    """Two runs that differ only in their validation split (the second's labels shuffled and its inputs noise)
    choose the same λ and R with the same scores: what they were chosen on is independent of that split."""
    spec = _spec(lambda_grid=[1e-4, 1e-3, 1e-2, 1e-1], recompute="auto")
    g = torch.Generator().manual_seed(0)
    x_val = torch.randn(digits.x_val.shape, generator=g) * 8
    other = dataclasses.replace(digits, x_val=x_val, y_val=digits.y_val[torch.randperm(len(x_val), generator=g)])
    picks = []
    for data in (digits, other):
        run = Run(spec, copy.deepcopy(digits_mlp), data, tmp_path)
        lam = run._choose_lambda()
        run.state.lam = lam
        picks.append((lam, run._choose_recompute(lam), run.state.lambda_sweep, run.state.recompute_sweep))
    assert picks[0] == picks[1]
    assert {s["split"] for s in picks[0][2] + picks[0][3]} == {"calibration"}
    assert len({s["score"] for s in picks[0][2]}) > 1  # the candidates do score differently


def test_the_r_sweep_scores_each_r_by_an_independent_prune_on_the_calibration_split(
    quick_kfac, digits, digits_mlp, tmp_path
):
    """The report's recompute_sweep: one entry per R of the grid at the chosen λ, each score the calibration accuracy
    of the engine's own prune at (λ, R, the run's seed) redone here; the chosen R has the lowest calibration loss;
    the R the λ sweep ran at is taken from that sweep, not pruned again. The job result carries both sweeps."""
    spec = _spec(recompute="auto")
    result = execute(spec, copy.deepcopy(digits_mlp), digits, tmp_path)
    report = result.report
    run = Run(spec, copy.deepcopy(digits_mlp), digits, tmp_path / "again")  # the same splits (seeded)
    sweep, lam = report["recompute_sweep"], report["lambda"]
    assert [s["recompute"] for s in sweep] == [1, 2, 4] and {s["split"] for s in sweep} == {"calibration"}
    assert all(s["lambda"] == lam and s["sparsity"] == 0.7 for s in sweep)
    default_r = method_info("kfac").default_recompute
    assert [s["from_lambda_sweep"] for s in sweep] == [r == default_r for r in (1, 2, 4)]
    names, state = run.names, copy.deepcopy(run.model.state_dict())

    def prune(r: int, seed: int) -> None:
        run.model.load_state_dict(state)
        make_pruner("kfac", spec.fisher_config(lam, seed), block_size=None, joint=False, recompute=r).prune(
            run.model, names, 0.7, (run.x, run.y)
        )

    for s in sweep:
        prune(s["recompute"], spec.seed)
        assert s["score"] == pytest.approx(evaluate(run.model, run.xc, run.yc, spec.loss)["accuracy"])
        assert s["loss"] == pytest.approx(evaluate(run.model, run.xc, run.yc, spec.loss)["loss"])
    chosen = report["recompute"]  # the lowest calibration loss, then the smaller R
    assert chosen == min(sweep, key=lambda s: (s["loss"], s["recompute"]))["recompute"]
    # the job's own prune ran at the chosen R: its weights are the engine's prune at (λ, R) with the step's seed
    prune(chosen, spec.seed * 1000)
    pruned = load_file(result.artifacts["pruned"])
    for n in names:
        torch.testing.assert_close(pruned[n], dict(run.model.named_parameters())[n].detach())
    assert report["metrics"]["splits"]["calibration"]["used_for"] == "lambda 'auto' and recompute 'auto'"
    from worker.runner import summarize

    summary = summarize(report, {})
    assert summary["recompute"] == report["recompute"] and summary["recompute_sweep"] == sweep
    assert summary["lambda_sweep"] == report["lambda_sweep"]
    assert report["spec"]["fisher"]["recompute"] == "auto"  # the spec as given; the chosen R is report["recompute"]


def test_a_fixed_r_sweeps_nothing_and_reports_its_r(digits, digits_mlp, tmp_path):
    report = execute(_spec(lambda_grid=[1e-3], recompute=3), copy.deepcopy(digits_mlp), digits, tmp_path).report
    assert report["recompute"] == 3 and report["recompute_sweep"] == []
    assert report["metrics"]["splits"]["calibration"]["used_for"] == "lambda 'auto'"
