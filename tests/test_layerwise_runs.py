"""Runs of the layer-wise methods (core/runs/run.py) on a zoo MLP and a small CNN, with every pattern."""

import json

import pytest
import torch
from safetensors.torch import load_file

from core.engine.patterns import Pattern, as_matrix
from core.errors import InvalidInput
from core.io.data import builtin_dataset
from core.io.zoo import build_model
from core.runs.run import execute
from core.runs.spec import PruneSpec


@pytest.fixture(scope="module")
def digits_images():
    return builtin_dataset("digits-image").split(0.2, 0)


def lenet():
    torch.manual_seed(0)
    return build_model("lenet5", in_channels=1, num_classes=10, input_size=8)


@pytest.mark.parametrize("method", ["sparsegpt", "obc", "wanda"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_layerwise_run_on_the_digits_mlp(digits, digits_mlp, tmp_path, method, pattern):
    body = {"method": method, "fisher": {"samples": 256}}
    body |= {"pattern": pattern} if pattern else {"sparsity": 0.7}
    result = execute(PruneSpec(**body), digits_mlp, digits, tmp_path)
    report = json.loads(result.artifacts["report"].read_text())
    target = 0.5 if pattern else 0.7
    assert report["sparsity"]["pruned_layers"] == pytest.approx(target, abs=0.01)
    assert report["pattern"] == {"pattern": pattern or "unstructured", "holds": True, "layers_checked": 2}
    assert report["lambda"] is None and report["memory_plan"] is None
    weights, masks = load_file(result.artifacts["pruned"]), load_file(result.artifacts["masks"])
    for name, mask in masks.items():
        assert torch.all(weights[name][mask == 0] == 0)
        if pattern:
            keep = as_matrix(mask).reshape(mask.shape[0], -1, 4)
            assert torch.all((keep == 0).sum(-1) == 2)
    assert report["metrics"]["after"]["validation"]["accuracy"] > 0.8  # digits MLP keeps most of its accuracy


@pytest.mark.parametrize("method", ["sparsegpt", "obc", "wanda"])
def test_layerwise_run_on_a_small_cnn(digits_images, tmp_path, method):
    """Convs through im2col: LeNet-5's two convs and three Linears, with block tiles on the Linears."""
    spec = PruneSpec(method=method, sparsity=0.5, fisher={"samples": 128})
    result = execute(spec, lenet(), digits_images, tmp_path / "u")
    report = result.report
    assert {layer["name"] for layer in report["layers"]} >= {"features.0.weight", "features.3.weight"}
    for layer in report["layers"]:
        assert layer["sparsity"] == pytest.approx(0.5, abs=0.05)
    spec = PruneSpec(
        method=method, sparsity=0.5, pattern="block:2x4", fisher={"samples": 128}, layers={"exclude": ["features.*"]}
    )
    report = execute(spec, lenet(), digits_images, tmp_path / "b").report
    assert report["pattern"] == {"pattern": "block:2x4", "holds": True, "layers_checked": 3}


def test_a_pattern_that_does_not_tile_a_layer_is_refused_before_work(digits_images, tmp_path):
    with pytest.raises(InvalidInput, match=r"pattern 2:4 does not fit 2 selected layer\(s\)") as err:
        execute(PruneSpec(method="sparsegpt", pattern="2:4"), lenet(), digits_images, tmp_path)
    assert err.value.errors[0]["loc"] == ["spec", "pattern"]
    assert not any(tmp_path.iterdir())
    assert Pattern.parse("2:4").fits((6, 1, 5, 5)) == "25 inputs per row are not a multiple of M = 4"


@pytest.mark.parametrize("method", ["sparsegpt", "obc", "wanda"])
def test_gradual_n_m_job_prunes_on_the_schedule_and_ends_at_the_pattern(digits, digits_mlp, tmp_path, method):
    """mode gradual with pattern 2:4: each schedule step prunes to its target within the pattern (the masks kept
    between steps and through fine-tuning), the last step reaches 2:4 exactly."""
    spec = PruneSpec(
        method=method,
        pattern="2:4",
        mode="gradual",
        schedule={"initial_sparsity": 0.2, "end_epoch": 2, "frequency": 1},
        finetune={"epochs": 3},
        fisher={"samples": 128},
    )
    result = execute(spec, digits_mlp, digits, tmp_path)
    report = result.report
    steps = [p["sparsity"] for p in report["curve"] if p["kind"] == "prune"]
    assert len(steps) == 3 and steps[0] < steps[1] < steps[2] and steps[0] == pytest.approx(0.2, abs=0.02)
    assert steps[-1] == pytest.approx(0.5, abs=1e-6)
    assert report["pattern"] == {"pattern": "2:4", "holds": True, "layers_checked": 2}
    masks = load_file(result.artifacts["masks"])
    for mask in masks.values():
        assert torch.all((as_matrix(mask).reshape(mask.shape[0], -1, 4) == 0).sum(-1) == 2)
