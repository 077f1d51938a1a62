"""The plots of a run (core/runs/report.py): worth looking at for a one-shot job, and the quadratic-model check."""

import pytest

from core.runs.report import (
    curve_figure,
    curve_png,
    lambda_sweep_figure,
    plot_title,
    quadratic_figure,
    quadratic_png,
)
from core.runs.run import execute
from core.runs.spec import PruneSpec

ONE_SHOT = [
    {"step": 0, "epoch": 0, "kind": "dense", "sparsity": 0.0, "loss": 0.05, "metric": 0.995, "split": "validation"},
    {"step": 1, "epoch": 0, "kind": "prune", "sparsity": 0.8, "loss": 0.09, "metric": 0.975, "split": "validation"},
]
STEPS = [
    {"step": 1, "sparsity": 0.5, "predicted_loss_change": 0.010, "actual_loss_change": 0.012},
    {"step": 2, "sparsity": 0.7, "predicted_loss_change": 0.030, "actual_loss_change": 0.041},
    {"step": 3, "sparsity": 0.9, "predicted_loss_change": 0.200, "actual_loss_change": 0.350},
]


def test_plot_title_names_model_method_target_and_lambda() -> None:
    assert plot_title("mlp", "woodfisher", 0.8, 1e-5) == "mlp · woodfisher · to 80% sparsity · λ = 1e-05"
    assert plot_title(None, "magnitude", 0.9, None) == "magnitude · to 90% sparsity"
    assert (
        plot_title("m", "woodfisher", 0.8, 0.1, "relative")
        == "m · woodfisher · to 80% sparsity · λ = 1e-01 × mean diag F"
    )


def test_one_shot_curve_is_not_auto_zoomed_and_names_its_axes_and_split() -> None:
    import matplotlib.pyplot as plt

    title = plot_title("mlp", "woodfisher", 0.8, 1e-5)
    fig = curve_figure(ONE_SHOT, "accuracy", title)
    ax, ax2 = fig.axes
    assert ax.get_title() == title
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 1.0  # not 0.97–1.00: a 2-point drop looks like one
    assert "validation" in ax.get_ylabel() and "accuracy" in ax.get_ylabel()
    assert "step" in ax.get_xlabel() and "sparsity" in ax2.get_ylabel()
    assert all(float(t).is_integer() for t in ax.get_xticks())  # steps, not 0.0 0.2 … 1.0
    dense_lines = [line for line in ax.get_lines() if list(line.get_ydata()) == [0.995, 0.995]]
    assert dense_lines, "the dense model's value is drawn as a line"
    plt.close(fig)
    assert curve_png(ONE_SHOT, "accuracy", title)[:4] == b"\x89PNG"
    assert "test" in curve_figure(ONE_SHOT, "accuracy", title, split="test").axes[0].get_ylabel()
    plt.close("all")


def test_quadratic_model_check_plots_predicted_against_actual() -> None:
    import matplotlib.pyplot as plt

    fig = quadratic_figure(STEPS, "mlp · woodfisher", split="validation")
    (ax,) = fig.axes
    (points,) = ax.collections
    assert points.get_offsets().ravel().tolist() == pytest.approx([0.010, 0.012, 0.030, 0.041, 0.200, 0.350])
    assert "predicted" in ax.get_xlabel() and "actual" in ax.get_ylabel() and "validation" in ax.get_ylabel()
    labels = [line.get_label() for line in ax.get_lines()]
    assert any("y = x" in label for label in labels) and any("fitted scale" in label for label in labels)
    assert [t.get_text() for t in ax.texts] == ["50%", "70%", "90%"]
    plt.close(fig)
    assert quadratic_png(STEPS, "t")[:4] == b"\x89PNG"
    assert quadratic_png([], "no steps")[:4] == b"\x89PNG"  # a run without pruning steps still gets a file


SWEEP = [
    {"lambda": 1e-3, "split": "calibration", "score": 0.90, "widened": False},
    {"lambda": 1e-2, "split": "calibration", "score": 0.80, "widened": False},
    {"lambda": 1e-4, "split": "calibration", "score": 0.95, "widened": True},
    {"lambda": 1e-5, "split": "calibration", "score": None, "widened": True, "error": "non-finite"},
    {"lambda": None, "split": "calibration", "score": None, "widened": False, "error": "λ = inf: non-finite"},
]


def test_lambda_sweep_plots_each_lambda_on_a_log_axis_with_the_chosen_one() -> None:
    import matplotlib.pyplot as plt

    fig = lambda_sweep_figure(SWEEP, 1e-4, "accuracy", "mlp · woodfisher")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and "λ" in ax.get_xlabel() and "calibration" in ax.get_ylabel()
    grid, widened, failed = ax.collections
    assert grid.get_offsets().tolist() == [[1e-3, 0.90], [1e-2, 0.80]]
    assert widened.get_offsets().tolist() == [[1e-4, 0.95]] and failed.get_offsets().tolist() == [[1e-5, 0.0]]
    assert any("chosen λ = 1e-04" in line.get_label() for line in ax.get_lines())
    assert ax.get_ylim()[0] == 0
    plt.close(fig)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_a_run_writes_the_curve_the_quadratic_check_and_the_lambda_sweep(digits, digits_mlp, tmp_path) -> None:
    spec = PruneSpec(sparsity=0.7, fisher={"lambda": "auto", "lambda_grid": [1e-4, 1e-2, 1.0], "samples": 32})
    result = execute(spec, digits_mlp, digits, tmp_path)
    names = {p.name for p in result.artifacts.values()}
    assert {"curve.png", "quadratic.png", "lambda_sweep.png"} <= names
    assert _png_size(result.artifacts["curve_png"].read_bytes()) == (700, 400)
    assert _png_size(result.artifacts["quadratic_png"].read_bytes()) == (550, 500)
    assert _png_size(result.artifacts["lambda_sweep_png"].read_bytes()) == (700, 400)
    assert len(result.report["quadratic_model"]["steps"]) == 1 and result.report["lambda_sweep"]


def test_magnitude_and_a_fixed_lambda_write_no_sweep_or_quadratic_plot(digits, digits_mlp, tmp_path) -> None:
    fixed = execute(PruneSpec(sparsity=0.5, fisher={"samples": 16, "recompute": 1}), digits_mlp, digits, tmp_path / "a")
    assert "lambda_sweep.png" not in {p.name for p in fixed.artifacts.values()}
    assert "quadratic.png" in {p.name for p in fixed.artifacts.values()}
    magnitude = execute(PruneSpec(method="magnitude", sparsity=0.5), digits_mlp, digits, tmp_path / "b")
    assert not {"lambda_sweep.png", "quadratic.png"} & {p.name for p in magnitude.artifacts.values()}
