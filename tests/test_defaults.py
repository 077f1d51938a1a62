"""Defaults that work (#13): the update and m resolved from the method and the data, λ 'auto' on a calibration
split with a grid that widens past a winning edge, and reports that name the split of every metric."""

import copy
import json
import math
import os

import pytest
import torch

from core.engine.curvature.base import generator
from core.engine.grads import fisher_gradients
from core.engine.layout import BlockLayout
from core.engine.methods import METHODS, Method, method_info
from core.errors import InvalidInput
from core.runs.budget import memory_plan
from core.runs.preflight import check_job
from core.runs.run import Run, calibration_size, execute
from core.runs.spec import DEFAULT_SAMPLES, PruneSpec, Update

MLP = {"arch": "mlp", "arch_kwargs": {"in_features": 64, "hidden": [32], "num_classes": 10}}


@pytest.mark.parametrize("method", list(METHODS))
def test_the_update_defaults_to_joint_where_the_method_has_it(method):
    spec = PruneSpec(method=method, sparsity=0.5)
    expected = Update.JOINT if method_info(method).supports_joint else Update.SUMMED
    assert spec.fisher.update is expected
    info = method_info(method)
    relative = info.default_lambda_relative is not None
    if info.default_lambda_sweep is not None:  # its default λ is the calibration sweep, on that scale's grid
        assert (spec.fisher.lambda_scale, spec.fisher.damping) == (info.default_lambda_sweep, "auto")
    else:
        assert spec.fisher.lambda_scale == ("relative" if relative else "absolute")
        assert spec.fisher.damping == (info.default_lambda_relative if relative else info.default_lambda)
    assert spec.fisher.recompute == ("auto" if info.default_recompute_sweep else info.default_recompute)
    assert spec.fisher.samples is None and spec.fisher.block_size == "auto"


@pytest.mark.parametrize(
    "method,scale,lam,recompute",
    [
        ("woodfisher", "relative", 0.1, 16),
        ("kfac", "absolute", "auto", 64),  # λ by the calibration sweep (README, Defaults)
        ("diag_fisher", "absolute", "auto", 16),
        ("woodtaylor", "absolute", 1e-1, 16),
    ],
)
def test_each_curvature_method_gets_its_own_measured_lambda_and_r(method, scale, lam, recompute):
    spec = PruneSpec(method=method, sparsity=0.9)
    assert (spec.fisher.lambda_scale, spec.fisher.damping, spec.fisher.recompute) == (scale, lam, recompute)
    # what the spec sets stays (a number alone is absolute, as before), and the stored spec validates back
    mine = PruneSpec(method=method, sparsity=0.9, fisher={"lambda": 0.5, "recompute": 3})
    assert (mine.fisher.lambda_scale, mine.fisher.damping, mine.fisher.recompute) == ("absolute", 0.5, 3)
    again = PruneSpec.model_validate(spec.model_dump(mode="json", by_alias=True))
    assert (again.fisher.lambda_scale, again.fisher.damping, again.fisher.recompute) == (scale, lam, recompute)


def test_lambda_scale_reads_lambda_and_the_grid():
    rel = PruneSpec(sparsity=0.9, fisher={"lambda": 0.1, "lambda_scale": "relative"})
    assert rel.fisher_config(0.1, 0).lam_scale == "relative" and rel.fisher.damping == 0.1
    assert PruneSpec(sparsity=0.9, fisher={"lambda": 1e-4}).fisher_config(1e-4, 0).lam_scale == "absolute"
    auto = PruneSpec(sparsity=0.9, fisher={"lambda": "auto"}).fisher  # scale-free grid by default
    assert (auto.lambda_scale, auto.lambda_grid) == ("relative", [1e-3, 1e-2, 1e-1, 1.0, 10.0])
    given = PruneSpec(sparsity=0.9, fisher={"lambda": "auto", "lambda_grid": [1e-4, 1e-2]}).fisher
    assert (given.lambda_scale, given.lambda_grid) == ("absolute", [1e-4, 1e-2])  # a given grid: absolute, as before
    absolute = PruneSpec(sparsity=0.9, fisher={"lambda": "auto", "lambda_scale": "absolute"}).fisher
    assert absolute.lambda_grid == [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    with pytest.raises(ValueError, match="absolute lambda only"):
        PruneSpec(method="exact_obs", sparsity=0.9, fisher={"lambda_scale": "relative"})
    kfac = PruneSpec(method="kfac", sparsity=0.9, fisher={"lambda_scale": "relative"}).fisher
    assert (kfac.damping, kfac.lambda_scale) == (0.1, "relative")  # no relative default of its own: α = 0.1
    # kfac's 'auto' (asked for, or its default) sweeps the grid its default was measured with
    swept = method_info("kfac").default_lambda_sweep
    assert PruneSpec(method="kfac", sparsity=0.9).fisher.lambda_scale == swept
    assert PruneSpec(method="kfac", sparsity=0.9, fisher={"lambda": "auto"}).fisher.lambda_scale == swept
    assert PruneSpec(method="magnitude", sparsity=0.9, fisher={"lambda_scale": "relative"})  # uses no λ at all


LENET = {"c1.weight": (6, 1, 5, 5), "c3.weight": (16, 6, 5, 5), "f5.weight": (120, 400), "f6.weight": (84, 120)}


def test_block_size_auto_takes_whole_layers_without_a_budget():
    plan = memory_plan(PruneSpec(sparsity=0.9, fisher={"samples": 512}), LENET)
    assert plan.block_size is None and plan.block_choice.startswith("auto: whole layers")
    assert "no budget being set" in plan.block_choice
    assert plan.as_dict()["block_choice"] == plan.block_choice  # in the report's memory_plan


def test_block_size_auto_without_a_budget_never_plans_past_half_the_machine(monkeypatch):
    """No budget set: 'auto' takes whole layers only while they fit half of this machine's memory (MiniLM's encoder
    at m = 512 would need 21.8 GB of gradients), else the largest block size within it."""
    import core.runs.budget as budget

    whole = memory_plan(PruneSpec(sparsity=0.9, fisher={"samples": 512}), LENET)
    monkeypatch.setattr(budget, "machine_memory_bytes", lambda: whole.total_bytes)  # half of it is too little
    plan = memory_plan(PruneSpec(sparsity=0.9, fisher={"samples": 512}), LENET)
    assert plan.block_size is not None and plan.total_bytes <= whole.total_bytes / 2
    assert "the largest that fits" in plan.block_choice and "this machine's memory" in plan.block_choice


def test_block_size_auto_without_a_budget_plans_within_the_memory_available_now(monkeypatch, tmp_path):
    """On a machine shared with other processes 'auto' plans within half of what they leave (MemAvailable), not half
    of all of it: MiniLM's whole encoder at the bare defaults planned 9.8 GB on a 24 GB machine where 11 GB were
    free, and was killed by the kernel."""
    import core.runs.budget as budget

    whole = memory_plan(PruneSpec(sparsity=0.9, fisher={"samples": 512}), LENET)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {2**40 // 1024} kB\nMemAvailable: {whole.total_bytes // 1024} kB\n")
    monkeypatch.setattr(budget, "MEMINFO", str(meminfo))
    assert budget.available_memory_bytes() == min(budget.machine_memory_bytes(), whole.total_bytes // 1024 * 1024)
    plan = memory_plan(PruneSpec(sparsity=0.9, fisher={"samples": 512}), LENET)
    assert plan.block_size is not None and plan.total_bytes <= whole.total_bytes / 2
    assert "available now" in plan.block_choice
    meminfo.write_text(f"MemAvailable: {4 * whole.total_bytes // 1024} kB\n")
    assert memory_plan(PruneSpec(sparsity=0.9, fisher={"samples": 512}), LENET).block_size is None


def test_block_size_auto_takes_whole_layers_within_a_budget_and_the_largest_block_that_fits_else():
    spec = PruneSpec(sparsity=0.9, fisher={"samples": 512})
    whole = memory_plan(spec, LENET)
    roomy = memory_plan(spec, LENET, server_mb=whole.total_bytes / 2**20 + 1)
    assert roomy.block_size is None and "within the budget" in roomy.block_choice
    short = memory_plan(spec, LENET, server_mb=(whole.total_bytes - 1) / 2**20)  # a byte short: a smaller chunk
    assert short.block_size is None and short.chunk < whole.chunk and "gradient chunk" in short.block_choice
    budget_mb = 0.6 * whole.total_bytes / 2**20  # below whole layers at any chunk: the server's budget applies
    tight = memory_plan(spec, LENET, server_mb=budget_mb)
    assert tight.block_size is not None and tight.total_bytes <= budget_mb * 2**20
    assert "the largest that fits" in tight.block_choice and "ARBORIST_MEMORY_BUDGET_MB" in tight.block_choice
    # the largest of the halving sequence from the largest layer (48000): twice it would not fit
    c = tight.block_size
    assert c == 48000 // 2 ** round(math.log2(48000 / c))
    assert (
        memory_plan(
            spec.model_copy(update={"fisher": spec.fisher.model_copy(update={"block_size": 2 * c})}), LENET
        ).total_bytes
        > budget_mb * 2**20
    )
    # the spec's budget, when lower, is the one named
    own = memory_plan(spec.model_copy(update={"memory_budget_mb": budget_mb}), LENET, server_mb=10_000)
    assert own.block_size == c and "spec.memory_budget_mb" in own.block_choice


def test_an_explicit_block_size_is_kept_and_said_so():
    plan = memory_plan(PruneSpec(sparsity=0.9, fisher={"samples": 512, "block_size": 64}), LENET)
    assert plan.block_size == 64 and plan.block_choice == "fisher.block_size = 64"
    assert memory_plan(PruneSpec(method="kfac", sparsity=0.9), LENET).block_choice is None


def test_kfac_defaults_to_summed_and_an_explicit_update_stays():
    assert PruneSpec(method="kfac", sparsity=0.5).fisher.update is Update.SUMMED
    assert PruneSpec(sparsity=0.5, fisher={"update": "summed"}).fisher.update is Update.SUMMED
    # the resolved spec validates again as it is (what a job stores and a worker reads back)
    dumped = PruneSpec(method="kfac", sparsity=0.5).model_dump(mode="json", by_alias=True)
    assert PruneSpec.model_validate(dumped).fisher.update is Update.SUMMED


@pytest.mark.parametrize(
    "fisher,train,expected",
    [
        ({}, 100, 100),  # as many as the training split allows
        ({}, 10_000, DEFAULT_SAMPLES),  # up to 512
        ({"batch_size": 8}, 1000, 125),  # whole Fisher mini-batches
        ({"batch_size": 8}, 3, 1),
        ({}, None, DEFAULT_SAMPLES),  # unknown size: the upper bound
        ({"samples": 64}, 10_000, 64),  # an explicit value stays
        ({"samples": 5000}, 100, 5000),
    ],
)
def test_default_samples_fit_the_training_split(fisher, train, expected):
    spec = PruneSpec(sparsity=0.5, fisher=fisher)
    assert spec.fisher_samples(train) == expected
    assert spec.resolved(train).fisher.samples == expected


def test_preflight_clamps_the_default_and_refuses_an_explicit_excess():
    common = dict(MLP, input_shape=[64], num_classes=10, has_val=False)
    check_job(PruneSpec(sparsity=0.5), num_examples=100, **common)  # default: 80 training examples → m = 80
    with pytest.raises(InvalidInput, match="exceeds") as err:
        check_job(PruneSpec(sparsity=0.5, fisher={"samples": 500}), num_examples=100, **common)
    assert err.value.errors[0]["loc"] == ["spec", "fisher", "samples"]
    # 'auto' holds a calibration split out of the 80: 72 left for the Fisher estimate
    check_job(PruneSpec(sparsity=0.5, fisher={"samples": 72, "lambda": "auto"}), num_examples=100, **common)
    with pytest.raises(InvalidInput, match="calibration split"):
        check_job(PruneSpec(sparsity=0.5, fisher={"samples": 73, "lambda": "auto"}), num_examples=100, **common)


def test_the_run_uses_the_resolved_samples(digits, digits_mlp, tmp_path):
    spec = PruneSpec(method="woodfisher", sparsity=0.5, fisher={"recompute": 1, "block_size": 32})
    run = Run(spec, digits_mlp, digits, tmp_path)
    assert run.spec.fisher.samples == min(DEFAULT_SAMPLES, len(digits.x_train))
    assert run.spec.fisher_config(1e-5, 0).m == run.spec.fisher.samples


def _fake_sweep(monkeypatch, run: Run, best_lambda: float) -> list[tuple[float, str]]:
    """Prunes nothing; scores a λ by its distance (in decades) to ``best_lambda``; records (λ, split) per score."""
    seen: list[tuple[float, str]] = []
    current = {}

    def prune(lam, seed, target, where, **kwargs):
        current["lam"] = lam
        return None, {}

    def metric(x, y):
        split = "validation" if x is run.xv else "calibration" if x is run.xc else "train" if x is run.x else "?"
        seen.append((current.get("lam"), split))
        distance = abs(math.log10(current["lam"]) - math.log10(best_lambda))
        return {"loss": 1.0 + distance, "accuracy": 1.0 - distance}  # the sweep ranks by the loss

    monkeypatch.setattr(run, "_prune_numerically", prune)
    monkeypatch.setattr(run, "_metric", metric)
    return seen


@pytest.mark.parametrize(
    "scale,best,chosen,widened",
    [
        ("absolute", 1e-4, 1e-4, []),  # inside the grid: no widening
        ("absolute", 1e-9, 1e-9, [1e-8, 1e-9, 1e-10, 1e-11]),  # below: widened twice, the second time past 1e-9
        ("absolute", 1e-12, 1e-11, [1e-8, 1e-9, 1e-10, 1e-11]),  # further below: at most twice
        ("absolute", 1.0, 1.0, [1.0, 10.0]),  # above: widened once, then 1 wins inside
        ("absolute", 1e2, 1e2, [1.0, 10.0, 1e2, 1e3]),  # further above: twice
        ("relative", 0.1, 0.1, []),  # the relative grid (α: 1e-3 … 10) brackets it
        ("relative", 1e-4, 1e-4, [1e-4, 1e-5]),  # below: widened once, then 1e-4 wins inside
        ("relative", 1e-9, 1e-7, [1e-4, 1e-5, 1e-6, 1e-7]),  # further below: at most twice
        ("relative", 1e2, 1e2, [1e2, 1e3]),  # above: once
    ],
)
def test_the_lambda_sweep_widens_past_a_winning_edge(
    monkeypatch, digits, digits_mlp, tmp_path, scale, best, chosen, widened
):
    spec = PruneSpec(sparsity=0.5, fisher={"lambda": "auto", "samples": 16, "recompute": 1, "lambda_scale": scale})
    run = Run(spec, digits_mlp, digits, tmp_path)
    seen = _fake_sweep(monkeypatch, run, best)
    assert run._choose_lambda() == pytest.approx(chosen)
    sweep = run.state.lambda_sweep
    grid = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1] if scale == "absolute" else [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    assert [s["lambda"] for s in sweep if not s["widened"]] == grid
    assert {s["lambda_scale"] for s in sweep} == {scale}
    assert [s["lambda"] for s in sweep if s["widened"]] == pytest.approx(widened)
    # every candidate scored on the calibration split, never on the validation split
    assert {split for _, split in seen} == {"calibration"} and len(seen) == len(sweep)
    assert {s["split"] for s in sweep} == {"calibration"}


def test_the_calibration_split_is_carved_from_training_and_seeded(digits, digits_mlp, tmp_path):
    spec = PruneSpec(sparsity=0.5, fisher={"lambda": "auto", "samples": 16, "recompute": 1})
    a, b = Run(spec, digits_mlp, digits, tmp_path), Run(spec, digits_mlp, digits, tmp_path)
    n = len(digits.x_train)
    assert len(a.xc) == calibration_size(n) and len(a.x) == n - len(a.xc)
    assert torch.equal(a.xc, b.xc) and torch.equal(a.x, b.x)  # deterministic
    rows = {tuple(r.tolist()) for r in digits.x_train}
    assert all(tuple(r.tolist()) in rows for r in a.xc)  # out of the training data
    fixed = Run(PruneSpec(sparsity=0.5, fisher={"samples": 16}), digits_mlp, digits, tmp_path)
    assert fixed.xc is None and len(fixed.x) == n  # a fixed λ holds nothing out


@pytest.mark.parametrize("method", [Method.MAGNITUDE, Method.GLOBAL_MAGNITUDE])
def test_magnitude_reports_no_lambda_no_fisher_plan_and_names_its_splits(method, digits, digits_mlp, tmp_path):
    spec = PruneSpec(method=method, sparsity=0.5, fisher={"lambda": "auto"})
    result = execute(spec, digits_mlp, digits, tmp_path)
    report = result.report
    assert report["lambda"] is None and report["memory_plan"] is None and report["block_size"] is None
    assert report["lambda_sweep"] == []  # nothing to sweep
    splits = report["metrics"]["splits"]
    assert splits == {
        "train": {"name": "train", "examples": len(digits.x_train)},
        "validation": {"name": "validation", "examples": len(digits.x_val)},
    }
    assert set(report["metrics"]["after"]) == set(splits)
    assert {p["split"] for p in report["curve"]} == {"validation"}


def test_woodfisher_reports_its_lambda_and_plan(digits, digits_mlp, tmp_path):
    """The default λ is relative: the report gives α, the scale and the effective λ = α × mean diag F̂, checked
    against the mean squared per-example gradient of the same Fisher samples (float64)."""
    spec = PruneSpec(sparsity=0.5, fisher={"samples": 32, "recompute": 1})
    run = Run(spec, copy.deepcopy(digits_mlp), digits, tmp_path)
    layout = BlockLayout.for_model(run.model, run.names, None)
    cfg = run.spec.fisher_config(1.0, spec.seed * 1000)  # the first pruning step's seed
    model64 = copy.deepcopy(run.model).double()
    grads = fisher_gradients(
        model64, layout, run.x.double(), run.y, m=32, generator=generator(cfg.seed), dtype=torch.float64
    ).grads
    mean_diag = float(grads.square().sum() / 32 / layout.numel)  # diag F̂ = Σᵢ gᵢ² / m, averaged over the weights
    report = run.execute().report
    alpha = method_info("woodfisher").default_lambda_relative
    assert (report["lambda"], report["lambda_scale"]) == (alpha, "relative") and report["memory_plan"][
        "total_bytes"
    ] > 0
    assert report["lambda_effective"] == pytest.approx(alpha * mean_diag, rel=1e-4)
    assert report["quadratic_model"]["steps"][0]["lambda_effective"] == report["lambda_effective"]
    assert report["spec"]["fisher"]["samples"] == 32 and report["spec"]["fisher"]["update"] == "joint"
    from worker.runner import summarize  # the job result names the splits and the effective λ too

    result = summarize(report, {})
    assert result["metrics"]["splits"]["validation"]["name"] == "validation"
    assert (result["lambda_scale"], result["lambda_effective"]) == ("relative", report["lambda_effective"])


def test_gradual_mode_without_epochs_fine_tunes_two_epochs_past_the_schedule():
    spec = PruneSpec(sparsity=0.9, mode="gradual")  # method + sparsity + mode: a valid gradual run
    assert spec.finetune.epochs == spec.schedule.end_epoch + 2 == 6
    late = PruneSpec(sparsity=0.9, mode="gradual", schedule={"end_epoch": 10, "frequency": 2})
    assert late.finetune.epochs == 12
    assert PruneSpec(sparsity=0.9).finetune.epochs == 0  # one-shot: no fine-tuning unless asked
    assert PruneSpec(sparsity=0.9, mode="gradual", finetune={"epochs": 9}).finetune.epochs == 9
    with pytest.raises(ValueError, match=r"end_epoch must be < finetune\.epochs"):
        PruneSpec(sparsity=0.9, mode="gradual", finetune={"epochs": 4})


def test_gradual_mode_without_optimizer_settings_gets_the_measured_fine_tuning():
    ft = PruneSpec(sparsity=0.95, mode="gradual").finetune
    assert (ft.optimizer, ft.lr, ft.lr_schedule, ft.momentum) == ("sgd", 0.05, "cosine", 0.9)
    mine = PruneSpec(sparsity=0.95, mode="gradual", finetune={"optimizer": "adam", "lr": 1e-3}).finetune
    assert (mine.optimizer, mine.lr, mine.lr_schedule) == ("adam", 1e-3, "constant")  # what the spec sets stays
    assert PruneSpec(sparsity=0.95, mode="gradual", finetune={"lr": 0.2}).finetune.lr_schedule == "constant"
    one_shot = PruneSpec(sparsity=0.95, finetune={"epochs": 3}).finetune  # one-shot fine-tuning: unchanged
    assert (one_shot.lr, one_shot.lr_schedule) == (0.01, "constant")


def test_cli_compare_gives_each_method_its_own_defaults(monkeypatch, tmp_path, digits_mlp):
    """``arborist compare`` re-runs the run file's spec per method: kfac must get summed, its λ sweep and its own R,
    not the woodfisher values the first spec resolved to (with 'joint' it was refused). kfac's R is 4 here: its
    sweep at R = 64 (seven prunes) takes minutes on a loaded machine."""
    import dataclasses

    import yaml
    from click.testing import CliRunner

    from cli.local import compare
    from core.io.model_files import save_state_dict

    monkeypatch.setitem(METHODS, Method.KFAC, dataclasses.replace(METHODS[Method.KFAC], default_recompute=4))

    save_state_dict(digits_mlp.state_dict(), tmp_path / "m.safetensors")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        yaml.safe_dump(
            {
                "model": {"arch": "mlp", "kwargs": MLP["arch_kwargs"], "weights": "m.safetensors"},
                "data": "digits",
                "spec": {"method": "woodfisher", "sparsity": 0.5, "fisher": {"samples": 16}, "device": "cpu"},
            }
        )
    )
    result = CliRunner().invoke(
        compare, [str(run_file), "--methods", "kfac,woodfisher", "--sparsities", "0.5", "--output", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "kfac-0.5" / "report.json").read_text())
    assert report["spec"]["fisher"]["update"] == "summed"
    assert (report["spec"]["fisher"]["lambda"], report["spec"]["fisher"]["recompute"]) == ("auto", 4)
    assert report["lambda"] in [s["lambda"] for s in report["lambda_sweep"]]
    assert {s["split"] for s in report["lambda_sweep"]} == {"calibration"} and report["recompute"] == 4
    woodfisher = json.loads((tmp_path / "o" / "woodfisher-0.5" / "report.json").read_text())
    assert (woodfisher["lambda"], woodfisher["lambda_scale"]) == (
        method_info("woodfisher").default_lambda_relative,
        "relative",
    )


def test_machine_memory_is_the_containers_limit_when_lower(monkeypatch, tmp_path):
    """A worker in a container limited below its host's memory plans within the container's limit (cgroup v2 file;
    'max' means no limit)."""
    import core.runs.budget as budget

    limit = tmp_path / "memory.max"
    monkeypatch.setattr(budget, "CGROUP_LIMITS", (str(limit),))
    limit.write_text("max\n")
    host = budget.machine_memory_bytes()
    assert host == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit.write_text(f"{2**30}\n")
    assert budget.machine_memory_bytes() == min(host, 2**30)


def test_a_check_that_passed_is_remembered_and_a_refusal_is_checked_again(monkeypatch):
    """Job creation's checks are a function of their arguments: a burst of creations for one model builds it once
    (the meta-device model and its forwards were 7 ms of the GIL each); a refused spec is checked each time."""
    import core.runs.preflight as preflight

    built = []
    real = preflight.build_architecture
    monkeypatch.setattr(preflight, "build_architecture", lambda *a, **k: built.append(a) or real(*a, **k))
    monkeypatch.setattr(preflight, "_PASSED", type(preflight._PASSED)())
    kw = dict(arch="mlp", arch_kwargs={"in_features": 64, "hidden": [17], "num_classes": 10}, num_examples=1000)
    kw |= dict(input_shape=[64], num_classes=10, has_val=False)
    first = check_job(PruneSpec(sparsity=0.5), **kw)
    again = check_job(PruneSpec(sparsity=0.5), **kw)
    assert len(built) == 1 and first is not again and first.as_dict() == again.as_dict()
    check_job(PruneSpec(sparsity=0.6), **kw)  # another spec, another check
    assert len(built) == 2
    for _ in range(2):
        with pytest.raises(InvalidInput):
            check_job(PruneSpec(sparsity=0.5), **{**kw, "input_shape": [63]})
    assert len(built) == 4
