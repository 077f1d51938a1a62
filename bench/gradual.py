"""Gradual-mode fine-tuning defaults (#13): which optimizer, learning rate and schedule a spec of just
``{"method": "woodfisher", "sparsity": s, "mode": "gradual"}`` should get.

Through the service's own path (``core.runs.run.execute`` with a ``PruneSpec``): the models of
``bench/quality.py`` (``--models``: the MLP 64-64-10 on digits, LeNet-5 on 8×8 digits-image; trained per seed), the
default cubic schedule (0 → s over epochs 0–4, one pruning step per epoch) and fine-tuning epochs = end_epoch + 2
(6), WoodFisher at its defaults. Each candidate fine-tuning setting is reported as validation accuracy at the end of
the run, mean over seeds, next to the one-shot default (no fine-tuning). Results saved with ``bench._util.save`` as
``bench/results/gradual.json``.

Usage: python bench/gradual.py [--seeds 1] [--sparsities 0.95] [--models mlp,lenet5]
                               [--settings 'sgd lr=0.05 cosine,...']
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import save
from bench.quality import trained
from core.runs.run import execute
from core.runs.spec import PruneSpec

CANDIDATES = {  # label: finetune section (epochs left to the default)
    "sgd lr=0.01 constant (old default)": {"optimizer": "sgd", "lr": 0.01, "lr_schedule": "constant"},
    "sgd lr=0.05 cosine": {"optimizer": "sgd", "lr": 0.05, "lr_schedule": "cosine"},
    "adam lr=1e-3 constant": {"optimizer": "adam", "lr": 1e-3, "lr_schedule": "constant"},
    "adam lr=1e-3 cosine": {"optimizer": "adam", "lr": 1e-3, "lr_schedule": "cosine"},
}


def run(model_key: str, seed: int, sparsity: float, finetune: dict | None) -> tuple[float, float]:
    model, data = trained(model_key, seed)
    spec = {"sparsity": sparsity, "seed": seed, "device": "cpu"}
    if finetune is not None:
        spec |= {"mode": "gradual", "finetune": finetune}
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        report = execute(PruneSpec.model_validate(spec), model, data, Path(out)).report
    return report["metrics"]["after"]["validation"]["accuracy"], time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--sparsities", default="0.95")
    ap.add_argument("--models", default="mlp", help="comma-separated: mlp, lenet5 (bench/quality.py's models)")
    ap.add_argument("--settings", default="", help="comma-separated labels of CANDIDATES (default: all, and one-shot)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    rows = []
    settings = {"one-shot default (no fine-tuning)": None, **CANDIDATES}
    if args.settings:
        settings = {k: settings[k] for k in args.settings.split(",")}
    for model_key in args.models.split(","):
        lines = []
        for label, ft in settings.items():
            cells, secs = [], []
            for sp in sparsities:
                accs = []
                for seed in range(args.seeds):
                    acc, s = run(model_key, seed, sp, ft)
                    accs.append(acc)
                    secs.append(s)
                    rows.append(
                        {
                            "model": model_key,
                            "setting": label,
                            "sparsity": sp,
                            "seed": seed,
                            "accuracy": acc,
                            "seconds": s,
                        }
                    )
                    print(f"  {model_key} {label} {sp:.0%} seed {seed}: {acc:.3f} ({s:.0f} s)", flush=True)
                cells.append(f"{statistics.fmean(accs):.3f}")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {statistics.fmean(secs):.1f} |")
            print(lines[-1], flush=True)
        print(f"\n{model_key}: validation accuracy at the end of the run, mean of {args.seeds} seed(s)")
        print("| setting | " + " | ".join(f"{s:.0%}" for s in sparsities) + " | job s |")
        print("|---|" + "---|" * (len(sparsities) + 1))
        print("\n".join(lines), flush=True)
    print("saved", save("gradual", rows))


if __name__ == "__main__":
    main()
