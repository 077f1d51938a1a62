"""Runs: masked fine-tuning, resume from any checkpoint, artifacts, validation, memory plan."""

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from core.engine.memory import fit
from core.engine.methods import Method
from core.errors import Canceled, DoesNotFit, InvalidInput
from core.runs.checkpoint import DirectoryCheckpointer
from core.runs.run import RunHooks, execute
from core.runs.schedule import pruning_events
from core.runs.spec import PruneSpec

GRADUAL = dict(
    method="woodfisher",
    sparsity=0.8,
    mode="gradual",
    schedule={"initial_sparsity": 0.2, "start_epoch": 0, "end_epoch": 2, "frequency": 1},
    finetune={"epochs": 3, "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-3, "batch_size": 128},
    fisher={"samples": 64, "lambda": 1e-3, "block_size": 64, "recompute": 2},
)


class Recorder(RunHooks):
    def __init__(self, cancel_after_checkpoints=None):
        self.events, self.points, self.fractions = [], [], []
        self.cancel_after = cancel_after_checkpoints

    def progress(self, fraction, message):
        self.fractions.append(fraction)

    def metric(self, point):
        self.points.append(point)

    def event(self, kind, data):
        self.events.append(kind)

    def cancelled(self):
        return self.cancel_after is not None and self.events.count("checkpoint") >= self.cancel_after


def test_gradual_run_keeps_pruned_weights_zero_and_writes_artifacts(digits, digits_mlp, tmp_path):
    hooks = Recorder()
    result = execute(
        PruneSpec(**GRADUAL), digits_mlp, digits, tmp_path / "out", hooks, DirectoryCheckpointer(tmp_path / "ck")
    )
    assert {p.name for p in result.artifacts.values()} == {
        "pruned.safetensors",
        "masks.safetensors",
        "compressed.safetensors",
        "model.onnx",
        "report.json",
        "curve.csv",
        "curve.png",
        "quadratic.png",
    }
    weights, masks = load_file(result.artifacts["pruned"]), load_file(result.artifacts["masks"])
    for name, mask in masks.items():  # exactly zero after three epochs of Adam with weight decay
        assert torch.all(weights[name][mask == 0] == 0)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((m == 0).sum()) for m in masks.values()) == round(0.8 * total)
    report = json.loads(result.artifacts["report"].read_text())
    assert report["sparsity"]["pruned_layers"] == pytest.approx(0.8, abs=1e-3)
    assert report["macs"]["sparse"] < 0.3 * report["macs"]["dense"]
    assert [s["sparsity"] for s in report["quadratic_model"]["steps"]] == pytest.approx([0.2, 0.725, 0.8])
    assert report["metrics"]["after"]["validation"]["accuracy"] > 0.8
    kinds = [p["kind"] for p in hooks.points]
    assert kinds == ["dense", "prune", "epoch", "prune", "epoch", "prune", "epoch"]
    assert hooks.fractions[-1] == 1.0 and hooks.fractions == sorted(hooks.fractions)
    assert result.artifacts["curve_png"].read_bytes()[:4] == b"\x89PNG"
    assert result.artifacts["curve_csv"].read_text().splitlines()[0].startswith("step,epoch,kind,sparsity")


@pytest.mark.parametrize("stop_after", [1, 3, 5])
def test_resume_from_any_checkpoint_matches_the_uninterrupted_run(digits, digits_mlp_state, tmp_path, stop_after):
    from core.io.zoo import build_model

    def fresh():
        m = build_model("mlp", in_features=64, hidden=[32], num_classes=10)
        m.load_state_dict(digits_mlp_state)
        return m

    spec = PruneSpec(**GRADUAL)
    whole = execute(spec, fresh(), digits, tmp_path / "a", None, DirectoryCheckpointer(tmp_path / "ck_a"))
    ck = DirectoryCheckpointer(tmp_path / "ck_b")
    with pytest.raises(Canceled):
        execute(spec, fresh(), digits, tmp_path / "b", Recorder(cancel_after_checkpoints=stop_after), ck)
    hooks = Recorder()
    resumed = execute(spec, fresh(), digits, tmp_path / "b", hooks, ck)
    assert "resumed" in hooks.events
    a, b = load_file(whole.artifacts["pruned"]), load_file(resumed.artifacts["pruned"])
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [p["kind"] for p in resumed.report["curve"]] == [p["kind"] for p in whole.report["curve"]]


def test_lambda_auto_sweeps_on_the_calibration_split(digits, digits_mlp, tmp_path):
    spec = PruneSpec(
        method="woodfisher",
        sparsity=0.7,
        fisher={"samples": 64, "lambda": "auto", "lambda_grid": [1e-4, 1e2], "recompute": 1},
    )
    hooks = Recorder()
    result = execute(spec, digits_mlp, digits, tmp_path, hooks)
    sweep = result.report["lambda_sweep"]
    assert [s["lambda"] for s in sweep][:2] == [1e-4, 1e2] and not any(s["widened"] for s in sweep[:2])
    assert {s["split"] for s in sweep} == {"calibration"}
    assert result.report["lambda"] == min(sweep, key=lambda s: s["loss"])["lambda"]  # the lowest calibration loss
    splits = result.report["metrics"]["splits"]
    assert splits["calibration"]["examples"] + splits["train"]["examples"] == len(digits.x_train)
    assert splits["validation"] == {"name": "validation", "examples": len(digits.x_val)}
    assert "lambda_chosen" in hooks.events


def test_too_many_fisher_samples_is_refused_before_work(digits, digits_mlp, tmp_path):
    with pytest.raises(InvalidInput, match="exceeds"):
        execute(PruneSpec(sparsity=0.5, fisher={"samples": 5000}), digits_mlp, digits, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "bad,loc,message",
    [
        ({"sparsity": 1.2}, ("sparsity",), "less than 1"),
        ({"sparsity": 0.5, "fisher": {"lambda": -1.0}}, ("fisher", "lambda"), "lambda must be > 0"),
        ({"sparsity": 0.5, "fisher": {"block_size": 0}}, ("fisher", "block_size"), "block_size must be ≥ 1"),
        ({"sparsity": 0.5, "method": "nope"}, ("method",), "'woodfisher'"),
        ({"sparsity": 0.5, "unknown": 1}, ("unknown",), "Extra inputs are not permitted"),
        # Rules across fields are the model's: no field location, the message names the fields.
        ({"sparsity": 0.5, "mode": "gradual", "finetune": {"epochs": 0}}, (), "gradual mode needs finetune.epochs ≥ 1"),
        ({"sparsity": 0.5, "method": "kfac", "fisher": {"update": "joint"}}, (), "kfac supports fisher.update"),
    ],
)
def test_invalid_specs_are_rejected_with_field_errors(bad, loc, message):
    with pytest.raises(ValidationError) as err:
        PruneSpec(**bad)
    [error] = err.value.errors()  # exactly one error, where it belongs, saying what is wrong
    assert tuple(error["loc"]) == loc
    assert message in error["msg"], error["msg"]


def test_memory_plan_refuses_or_shrinks_blocks():
    shapes = {"a": (1000, 1000)}  # m = 256: 1 GB of gradients, and 1 GB of Woodbury factors at c = 1000
    with pytest.raises(DoesNotFit, match="MiB"):
        fit(Method.WOODFISHER, shapes, 1000, 256, 4, 1500 * 2**20, False)
    plan = fit(Method.WOODFISHER, shapes, 1000, 256, 4, 1500 * 2**20, True)
    assert plan.block_size < 1000 and plan.total_bytes <= 1500 * 2**20


def test_cubic_schedule():
    spec = PruneSpec(
        sparsity=0.9,
        mode="gradual",
        finetune={"epochs": 10},
        schedule={"initial_sparsity": 0.1, "start_epoch": 2, "end_epoch": 8, "frequency": 2},
    )
    events = pruning_events(spec)
    assert list(events) == [2, 4, 6, 8]
    expect = [0.9 - 0.8 * (1 - p) ** 3 for p in (0, 1 / 3, 2 / 3, 1)]
    assert list(events.values()) == pytest.approx(expect)
