"""Run outputs a person reads: FLOP/parameter counts, the metrics curve as CSV and PNG, the quadratic-model check."""

from __future__ import annotations

import csv
import io
import math

import torch
from torch import Tensor, nn

from core.engine.modes import eval_mode

CURVE_FIELDS = ["step", "epoch", "kind", "sparsity", "loss", "metric", "seconds"]


@torch.no_grad()
def count_macs(model: nn.Module, example: Tensor, masks: dict[str, Tensor] | None = None) -> tuple[int, int]:
    """(dense, sparse) multiply-accumulates of one forward on ``example[:1]`` over Linear/Conv layers."""
    masks = masks or {}
    totals = [0, 0]
    hooks = []

    def hook(name):
        def fn(mod, inp, out):
            per_out = mod.weight[0].numel()
            dense = out[0].numel() * per_out
            density = float(masks[name].float().mean()) if name in masks else 1.0
            totals[0] += dense
            totals[1] += round(dense * density)

        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            hooks.append(mod.register_forward_hook(hook(f"{name}.weight" if name else "weight")))
    try:
        with eval_mode(model):
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return totals[0], totals[1]


def curve_csv(points: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(points)
    return buf.getvalue()


def plot_title(
    model: str | None, method: str, target: float | None, lam: float | None, scale: str | None = None
) -> str:
    """The title every plot of a run carries: model, method, target sparsity and λ (a relative λ as its factor α of
    the mean Fisher diagonal)."""
    parts = [p for p in (model, method) if p]
    if target is not None:
        parts.append(f"to {target:.0%} sparsity")
    if lam is not None:
        parts.append(f"λ = {lam:.0e} × mean diag F" if scale == "relative" else f"λ = {lam:.0e}")
    return " · ".join(parts)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def curve_figure(points: list[dict], metric: str, title: str, split: str | None = None):
    """The metric (left axis, from 0, with the dense model's value as a line) and sparsity (right axis) per step.

    Steps are whole numbers (0 = the dense model); the metric's split is named on its axis (``split``, else the
    points' own ``split``)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    split = split or next((p["split"] for p in points if p.get("split")), None)
    steps = [p["step"] for p in points]
    values = [p["metric"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, values, "o-", color="tab:blue", label=metric)
    dense = next((p["metric"] for p in points if p.get("kind") == "dense"), None)
    if dense is not None:
        ax.axhline(dense, color="tab:blue", linestyle=":", linewidth=1, label=f"dense {metric} {dense:.4g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("pruning step (0 = dense model)")
    ax.set_ylabel(f"{metric} ({split} split)" if split else metric, color="tab:blue")
    finite = [v for v in values if v is not None and v == v]
    if finite and min(finite) >= 0:  # a score: its axis starts at 0, so a 2-point drop does not look like a collapse
        top = max(finite)
        ax.set_ylim(0, 1.02 if top <= 1 else top * 1.05)
    ax2 = ax.twinx()
    ax2.plot(steps, [p["sparsity"] for p in points], "s--", color="tab:orange", label="sparsity")
    ax2.set_ylabel("sparsity (fraction of weights zero)", color="tab:orange")
    ax2.set_ylim(0, 1)
    ax.legend(loc="lower left", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def curve_png(points: list[dict], metric: str, title: str, split: str | None = None) -> bytes:
    """:func:`curve_figure` as PNG."""
    return _png(curve_figure(points, metric, title, split))


def quadratic_figure(steps: list[dict], title: str, split: str | None = None):
    """The quadratic model's check (the paper's Fig. 2): the loss change it predicted for each pruning step against
    the one measured, with the line y = x (a perfect model) and the least-squares scale through 0.

    ``steps`` are the report's ``quadratic_model.steps`` (``predicted_loss_change``, ``actual_loss_change``,
    ``sparsity``, ``step``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=100)
    pred = [float(s["predicted_loss_change"]) for s in steps]
    act = [float(s["actual_loss_change"]) for s in steps]
    ax.scatter(pred, act, color="tab:blue", zorder=3, label="pruning steps")
    for s, x, y in zip(steps, pred, act, strict=True):
        ax.annotate(f"{s['sparsity']:.0%}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    lo, hi = min([0.0, *pred, *act]), max([0.0, *pred, *act])
    span = (hi - lo) or 1.0
    lo, hi = lo - 0.05 * span, hi + 0.05 * span
    ax.plot([lo, hi], [lo, hi], "--", color="gray", linewidth=1, label="y = x (exact quadratic model)")
    den = sum(x * x for x in pred)
    if den > 0:
        scale = sum(x * y for x, y in zip(pred, act, strict=True)) / den
        ax.plot([lo, hi], [scale * lo, scale * hi], ":", color="tab:orange", label=f"fitted scale {scale:.3g}")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted loss change (quadratic model)")
    ax.set_ylabel(f"actual loss change ({split} split)" if split else "actual loss change")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def quadratic_png(steps: list[dict], title: str, split: str | None = None) -> bytes:
    """:func:`quadratic_figure` as PNG."""
    return _png(quadratic_figure(steps, title, split))


def lambda_sweep_figure(sweep: list[dict], chosen: float | None, metric: str, title: str):
    """λ = 'auto': the score of each λ tried (log axis) on its split (the calibration split), the widened tries
    marked apart from the grid's, the chosen λ as a vertical line; λ values whose prune went non-finite sit on the
    axis as crosses. ``sweep`` is the report's ``lambda_sweep`` (a λ that is not a positive finite number, written as
    null in strict JSON, has no place on a log axis and is left out)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    split = next((s["split"] for s in sweep if s.get("split")), None)
    usable = [s for s in sweep if isinstance(s.get("lambda"), (int, float)) and 0 < s["lambda"] < math.inf]
    rows = sorted(usable, key=lambda s: s["lambda"])
    scored = [s for s in rows if s.get("score") is not None]
    ax.plot([s["lambda"] for s in scored], [s["score"] for s in scored], "-", color="tab:blue", linewidth=1)
    for widened, marker, label in ((False, "o", "lambda_grid"), (True, "D", "widened past an edge")):
        pts = [s for s in scored if bool(s.get("widened")) is widened]
        if pts:
            ax.scatter([s["lambda"] for s in pts], [s["score"] for s in pts], marker=marker, zorder=3, label=label)
    failed = [s["lambda"] for s in rows if s.get("score") is None]
    if failed:
        ax.scatter(failed, [0.0] * len(failed), marker="x", color="tab:red", zorder=3, label="non-finite")
    if chosen is not None:
        ax.axvline(chosen, color="tab:green", linestyle="--", linewidth=1, label=f"chosen λ = {chosen:.0e}")
    ax.set_xscale("log")
    ax.set_xlabel("λ (dampening)")
    ax.set_ylabel(f"{metric} ({split} split)" if split else metric)
    values = [s["score"] for s in scored]
    if metric == "accuracy" or (values and min(values) >= 0):
        ax.set_ylim(0, 1.02 if not values or max(values) <= 1 else max(values) * 1.05)
    ax.legend(loc="lower left", fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def lambda_sweep_png(sweep: list[dict], chosen: float | None, metric: str, title: str) -> bytes:
    """:func:`lambda_sweep_figure` as PNG."""
    return _png(lambda_sweep_figure(sweep, chosen, metric, title))
