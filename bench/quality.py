"""One-shot quality sweep on digits: every method × sparsity × seed, plus a short gradual run.

Models: an MLP (64-64-10) and LeNet-5 on 8×8 digit images, each trained here per seed. Each cell
is validation accuracy right after one-shot pruning (no fine-tuning), mean over seeds. Every method runs at its own
service defaults (m = 512, λ and R from MethodInfo, whole-layer blocks as block_size "auto" takes them here).
Usage: python bench/quality.py [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import save
from core.engine.curvature.base import FisherConfig
from core.engine.layout import select_parameters
from core.engine.methods import method_info
from core.engine.pruner import make_pruner
from core.io.data import builtin_dataset
from core.io.zoo import build_model
from core.runs.run import execute
from core.runs.spec import FinetuneSpec, PruneSpec
from core.runs.train import evaluate, make_optimizer, train_epoch

SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]
M = 512  # Fisher samples
METHODS = {  # label: (method, joint); λ and R are each method's defaults (MethodInfo.default_lambda/_recompute)
    "woodfisher (joint)": ("woodfisher", True),
    "woodfisher (summed)": ("woodfisher", False),
    "woodtaylor": ("woodtaylor", True),
    "kfac": ("kfac", False),
    "diag_fisher": ("diag_fisher", False),
    "global_magnitude": ("global_magnitude", False),
    "magnitude": ("magnitude", False),
}
MODELS = {
    "mlp": ("digits", "mlp", {"in_features": 64, "hidden": [64], "num_classes": 10}),
    "lenet5": ("digits-image", "lenet5", {"in_channels": 1, "num_classes": 10, "input_size": 8}),
}


def trained(model_key: str, seed: int):
    data_name, arch, kwargs = MODELS[model_key]
    data = builtin_dataset(data_name).split(0.2, seed)
    torch.manual_seed(seed)
    model = build_model(arch, **kwargs)
    opt = make_optimizer(model, FinetuneSpec(optimizer="adam", lr=3e-3))
    for e in range(40):
        train_epoch(
            model,
            data.x_train,
            data.y_train,
            opt,
            loss="cross_entropy",
            batch_size=64,
            masks={},
            generator=torch.Generator().manual_seed(seed * 100 + e),
        )
    return model, data


def one_shot(models: list[str], seeds: int, sparsities: list[float]) -> list[dict]:
    rows = []
    for model_key in models:
        for seed in range(seeds):
            model, data = trained(model_key, seed)
            dense = evaluate(model, data.x_val, data.y_val, "cross_entropy")["accuracy"]
            state = copy.deepcopy(model.state_dict())
            names = select_parameters(model)
            for label, (method, joint) in METHODS.items():
                info = method_info(method)
                recompute = info.default_recompute if info.needs_gradients else 1
                for s in sparsities:
                    model.load_state_dict(state)
                    cfg = FisherConfig(m=M, lam=info.default_lambda, chunk=128, seed=seed)
                    # block_size None: whole layers, what block_size 'auto' takes for these models without a budget
                    make_pruner(method, cfg, block_size=None, joint=joint, recompute=recompute).prune(
                        model, names, s, (data.x_train, data.y_train)
                    )
                    acc = evaluate(model, data.x_val, data.y_val, "cross_entropy")["accuracy"]
                    rows.append(
                        {
                            "model": model_key,
                            "seed": seed,
                            "method": label,
                            "sparsity": s,
                            "accuracy": acc,
                            "dense": dense,
                        }
                    )
            print(f"  {model_key} seed {seed} done (dense {dense:.3f})", flush=True)
    return rows


def gradual(seed: int = 0) -> list[dict]:
    rows = []
    for method in ("woodfisher", "global_magnitude"):
        model, data = trained("mlp", seed)
        spec = PruneSpec(
            method=method,
            sparsity=0.95,
            mode="gradual",
            schedule={"initial_sparsity": 0.5, "start_epoch": 0, "end_epoch": 4, "frequency": 1},
            finetune={"epochs": 6, "optimizer": "adam", "lr": 1e-3},
            fisher={"samples": 512, "lambda": 1e-3, "recompute": 4, "update": "joint"},
            seed=seed,
        )
        r = execute(spec, model, data, Path(f"bench/results/gradual-{method}")).report
        rows.append({"method": method, "sparsity": 0.95, "accuracy": r["metrics"]["after"]["validation"]["accuracy"]})
    return rows


def table(rows: list[dict], sparsities: list[float]) -> str:
    out = []
    for model_key in dict.fromkeys(r["model"] for r in rows):
        dense = sum(
            r["dense"]
            for r in rows
            if r["model"] == model_key and r["method"] == "magnitude" and r["sparsity"] == sparsities[0]
        ) / len({r["seed"] for r in rows})
        out.append(f"\n{model_key} (dense {dense:.3f}), val accuracy after one-shot pruning, mean of seeds")
        out.append("| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
        out.append("|---|" + "---|" * len(sparsities))
        for label in METHODS:
            cells = []
            for s in sparsities:
                vals = [
                    r["accuracy"]
                    for r in rows
                    if r["model"] == model_key and r["method"] == label and r["sparsity"] == s
                ]
                cells.append(f"{sum(vals) / len(vals):.3f}")
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: mlp,lenet5")
    ap.add_argument("--no-gradual", action="store_true")
    ap.add_argument("--quick", action="store_true", help="MLP only, one seed, two sparsities")
    args = ap.parse_args()
    models, seeds, sparsities = (
        (["mlp"], 1, [0.7, 0.9]) if args.quick else (args.models.split(","), args.seeds, SPARSITIES)
    )
    rows = one_shot(models, seeds, sparsities)
    print(table(rows, sparsities))
    grad = [] if args.quick or args.no_gradual else gradual()
    for g in grad:
        print(f"gradual to 95 % with fine-tuning: {g['method']:18} val accuracy {g['accuracy']:.3f}")
    print("saved", save("quality-" + "-".join(models), rows + grad))


if __name__ == "__main__":
    main()
