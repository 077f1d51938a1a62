"""Run outputs a person reads: FLOP/parameter counts, the metrics curve as CSV and PNG."""

from __future__ import annotations

import csv
import io

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


def curve_png(points: list[dict], metric: str, title: str) -> bytes:
    """Sparsity and the metric against step, on two axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [p["metric"] for p in points], "o-", color="tab:blue", label=metric)
    ax.set_xlabel("step")
    ax.set_ylabel(metric, color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [p["sparsity"] for p in points], "s--", color="tab:orange", label="sparsity")
    ax2.set_ylabel("sparsity", color="tab:orange")
    ax2.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
