"""Defaults from measurements (issue #13, phase 1): which WoodFisher settings to use when a spec gives none.

Three splits per seed, none shared: ``builtin_dataset(...).split(0.2, seed)`` gives train and **test** (its
validation split, the only one reported); 20 % of train is carved off as **calibration** (λ/R choices); the model is
fitted on the rest (**fit**), which also supplies the Fisher samples. Models and training as ``bench/quality.py``
(MLP 64-64-10 on digits, LeNet-5 on 8×8 digits-image, 40 epochs of Adam, one model per seed). Every cell is test
accuracy right after a one-shot prune (no fine-tuning), mean over seeds.

Stages (``--stages``, comma-separated; the default is ``confirm,auto,other,cost``):

* ``search``  coarse search, seed 0 only: λ × R grid (joint), summed vs joint, m, block size c, on both models.
* ``explore`` every seed: sub-step schedule (linear/geometric) × λ × R, then m, c, update (what chose the default).
* ``confirm`` defaults vs best-known settings side by side, both models, every seed, 50–95 %.
* ``auto``    auto-λ (and auto-R) chosen one-shot on the calibration split, against the best fixed λ on test.
* ``other``   kfac and diag_fisher: λ × R grids; the old fixed defaults and the calibration sweeps (``--variants``:
              λ auto on the absolute or a relative grid, ranked by calibration accuracy or loss, with or without
              R auto; 'auto abs by loss' is what their default runs now) against the best cell of their own grid.
* ``cost``    wall time of a default one-shot prune per model (min of 3; the machine may be shared).

Usage: python bench/defaults.py [--seeds 3] [--stages confirm,auto,other,cost] [--models mlp,lenet5]
                                [--auto-all] [--auto-r] [--methods kfac,diag_fisher] [--cache FILE.pkl]
From scratch the default stages take about 25–30 min on one thread here (``--stages confirm,cost``: ~12 min); with a
``--cache`` holding earlier prunes only the timings are measured again. Rows are saved with ``bench._util.save`` as
``bench/results/defaults-<stages>.json``.

Sub-steps are done here by calling the engine once per sub-step (``prune`` below), so that linear (s·r/R, the
engine's spacing when this was measured) and geometric spacing can be compared on the same models; the search found
linear spacing to collapse at 90–95 %, and the engine's ``recompute`` is now geometric
(``core.engine.pruner.substep_targets``).
"""

from __future__ import annotations

import argparse
import copy
import math
import pickle
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import save
from core.engine.curvature.base import FisherConfig
from core.engine.layout import select_parameters
from core.engine.pruner import make_pruner
from core.io.data import builtin_dataset
from core.io.zoo import build_model
from core.runs.spec import FinetuneSpec
from core.runs.train import evaluate, make_optimizer, train_epoch

SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95]
BAR = [0.5, 0.7, 0.8, 0.9]  # where the defaults must be within TOLERANCE of the best known (0.95 is reported)
TOLERANCE = 0.005
CAL_FRACTION = 0.2
MODELS = {
    "mlp": ("digits", "mlp", {"in_features": 64, "hidden": [64], "num_classes": 10}),
    "lenet5": ("digits-image", "lenet5", {"in_channels": 1, "num_classes": 10, "input_size": 8}),
}


@dataclass(frozen=True)
class Setting:
    """One pruning configuration; block None = one block per layer."""

    method: str = "woodfisher"
    m: int = 512
    lam: float = 1e-3
    recompute: int = 16
    joint: bool = True
    block: int | None = 128
    schedule: str = "linear"  # sub-step targets: linear s·r/R (the engine's) or geometric 1 − (1 − s)^(r/R)
    scale: str = "absolute"  # λ absolute, or α × mean diag F̂ ('relative': over all layers, 'relative_layer')

    def label(self) -> str:
        upd = "joint" if self.joint else "summed"
        c = "layer" if self.block is None else self.block
        geo = " geometric" if self.schedule == "geometric" else ""
        if self.scale != "absolute":
            geo += f" {self.scale}"
        if self.method == "woodfisher":
            return f"m={self.m} λ={self.lam:g} R={self.recompute}{geo} {upd} c={c}"
        return f"{self.method} m={self.m} λ={self.lam:g} R={self.recompute}{geo}"

    def replace(self, **kw) -> Setting:
        return Setting(**{**self.__dict__, **kw})


BEST_KNOWN = Setting()  # README quality table: m=512, λ=1e-3, R=16 (linear sub-steps), joint, c=128
# what this bench recommends as the spec's defaults: geometric sub-steps (each prunes the same fraction of the
# weights still alive; the engine's recompute is linear today), one block per layer, λ = 1e-5
ABSOLUTE_DEFAULT = Setting(m=512, lam=1e-5, recompute=16, joint=True, block=None, schedule="geometric")
#: what a job runs today (core.engine.methods: woodfisher's default_lambda_relative): λ = 0.1 × mean diag F̂
DEFAULT = ABSOLUTE_DEFAULT.replace(lam=0.1, scale="relative")
ALTERNATIVES = {  # shown next to the default in the confirm table; each was best in some cell of the search
    "geo c=layer λ=1e-5 (the absolute default before)": ABSOLUTE_DEFAULT,
    "geo c=layer λ=1e-4": ABSOLUTE_DEFAULT.replace(lam=1e-4),
    "geo c=128 λ=1e-5": ABSOLUTE_DEFAULT.replace(block=128),
}
LAMBDA_GRID = [10.0**e for e in range(-5, 2)]  # 1e-5 … 1e1
R_GRID = [4, 8, 16, 32]
# auto-λ sweeps cost len(grid) prunes per cell: LeNet-5 at the default is ~7 s a prune here, so only 90 % by default
AUTO_SPARSITIES = {"mlp": SPARSITIES, "lenet5": [0.9]}


# ----------------------------------------------------------------------------------------------- data & models
@dataclass
class Case:
    """A trained model for one (model, seed) and its three splits."""

    model: torch.nn.Module
    state: dict
    names: list[str]
    fit: tuple[torch.Tensor, torch.Tensor]
    cal: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    dense: dict[str, float]


def make_case(model_key: str, seed: int) -> Case:
    data_name, arch, kwargs = MODELS[model_key]
    data = builtin_dataset(data_name).split(0.2, seed)
    n = len(data.x_train)
    n_cal = round(n * CAL_FRACTION)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + seed))
    cal_idx, fit_idx = perm[:n_cal].sort().values, perm[n_cal:].sort().values
    fit = (data.x_train[fit_idx], data.y_train[fit_idx])
    cal = (data.x_train[cal_idx], data.y_train[cal_idx])
    test = (data.x_val, data.y_val)
    torch.manual_seed(seed)
    model = build_model(arch, **kwargs)
    opt = make_optimizer(model, FinetuneSpec(optimizer="adam", lr=3e-3))
    for e in range(40):  # as bench/quality.py, on the fit split only
        train_epoch(
            model,
            *fit,
            opt,
            loss="cross_entropy",
            batch_size=64,
            masks={},
            generator=torch.Generator().manual_seed(seed * 100 + e),
        )
    dense = {
        "cal": evaluate(model, *cal, "cross_entropy")["accuracy"],
        "test": evaluate(model, *test, "cross_entropy")["accuracy"],
    }
    return Case(model, copy.deepcopy(model.state_dict()), select_parameters(model), fit, cal, test, dense)


def prune(st: Setting, c: Case, sparsity: float, seed: int) -> None:
    """One-shot prune of c.model in place. The geometric schedule is the engine's own ``recompute`` (what a job
    runs); the linear one (s·r/R, the engine's spacing before this wave) calls the engine once per sub-step."""
    cfg = FisherConfig(m=min(st.m, len(c.fit[0])), lam=st.lam, chunk=128, seed=seed, lam_scale=st.scale)
    if st.schedule == "geometric":
        make_pruner(st.method, cfg, block_size=st.block, joint=st.joint, recompute=st.recompute).prune(
            c.model, c.names, sparsity, c.fit
        )
        return
    pruner = make_pruner(st.method, cfg, block_size=st.block, joint=st.joint, recompute=1)
    masks = None
    for r in range(1, st.recompute + 1):
        masks = pruner.prune(c.model, c.names, sparsity * r / st.recompute, c.fit, masks=masks)


class Bench:
    """Trains each (model, seed) once and memoises every prune by (model, seed, setting, sparsity)."""

    def __init__(self) -> None:
        self.cases: dict[tuple[str, int], Case] = {}
        self.results: dict[tuple, dict] = {}

    def case(self, model_key: str, seed: int) -> Case:
        if (model_key, seed) not in self.cases:
            self.cases[(model_key, seed)] = make_case(model_key, seed)
        return self.cases[(model_key, seed)]

    def run(self, model_key: str, seed: int, st: Setting, sparsity: float) -> dict:
        key = (model_key, seed, st, sparsity)
        if key in self.results:
            return self.results[key]
        c = self.case(model_key, seed)
        c.model.load_state_dict(c.state)
        t = time.perf_counter()
        prune(st, c, sparsity, seed)
        seconds = time.perf_counter() - t
        cal = evaluate(c.model, *c.cal, "cross_entropy")
        test = evaluate(c.model, *c.test, "cross_entropy")
        row = {
            "model": model_key,
            "seed": seed,
            **{k: v for k, v in st.__dict__.items()},
            "sparsity": sparsity,
            "cal_acc": cal["accuracy"],
            "cal_loss": cal["loss"] if math.isfinite(cal["loss"]) else 1e9,
            "test_acc": test["accuracy"],
            "test_loss": test["loss"] if math.isfinite(test["loss"]) else 1e9,
            "seconds": seconds,
            "dense_test": c.dense["test"],
        }
        self.results[key] = row
        return row

    def mean(self, model_key: str, seeds: list[int], st: Setting, sparsity: float, field: str = "test_acc") -> float:
        return statistics.fmean(self.run(model_key, s, st, sparsity)[field] for s in seeds)

    def rows(self) -> list[dict]:
        return list(self.results.values())


# ------------------------------------------------------------------------------------------------------ tables
def fmt_table(title: str, header: list[str], lines: list[list[str]]) -> str:
    out = [title, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def settings_table(b: Bench, model_key: str, seeds: list[int], settings: dict[str, Setting], sps=SPARSITIES) -> str:
    lines = []
    for label, st in settings.items():
        cells = [f"{b.mean(model_key, seeds, st, s):.3f}" for s in sps]
        secs = statistics.fmean(b.run(model_key, sd, st, s)["seconds"] for sd in seeds for s in sps)
        lines.append([label, *cells, f"{secs:.2f}"])
    dense = statistics.fmean(b.case(model_key, s).dense["test"] for s in seeds)
    return fmt_table(
        f"\n{model_key} (dense {dense:.3f}), test accuracy after one-shot pruning, mean of {len(seeds)} seed(s)",
        ["setting", *[f"{s:.0%}" for s in sps], "prune s"],
        lines,
    )


# ------------------------------------------------------------------------------------------------------ stages
def stage_search(b: Bench, models: list[str]) -> None:
    """Seed 0: λ × R (joint) on a wide grid, then summed, m and c around the best-known setting."""
    seeds = [0]
    for mk in models:
        lam_grid = [10.0**e for e in range(-6, 3)]
        r_grid = [1, 4, 8, 16, 32, 64] if mk == "mlp" else [4, 16, 32]
        for sp in SPARSITIES:
            lines = []
            for lam in lam_grid:
                cells = [f"{b.mean(mk, seeds, BEST_KNOWN.replace(lam=lam, recompute=r), sp):.3f}" for r in r_grid]
                lines.append([f"λ={lam:g}", *cells])
            title = f"\n{mk} {sp:.0%}: λ × R (joint, m=512, c=128, linear sub-steps), seed 0"
            print(fmt_table(title, ["", *[f"R={r}" for r in r_grid]], lines))
        variants = {"best-known": BEST_KNOWN}
        for r in (16, 32):
            variants[f"summed R={r}"] = BEST_KNOWN.replace(joint=False, recompute=r)
        for m in (128, 256, 1024):
            variants[f"m={m}"] = BEST_KNOWN.replace(m=m)
        for c in (32, 64, 256, None):
            variants[f"c={c or 'layer'}"] = BEST_KNOWN.replace(block=c)
        for lam in (3e-4, 3e-3, 3e-2):
            variants[f"λ={lam:g}"] = BEST_KNOWN.replace(lam=lam)
        print(settings_table(b, mk, seeds, variants))


def stage_explore(b: Bench, seeds: list[int]) -> None:
    """The every-seed comparisons the defaults were chosen from: sub-step schedule × λ × R, then m, c, update."""
    geo = BEST_KNOWN.replace(schedule="geometric")
    mlp = {
        f"linear λ={lam:g} R={r}": BEST_KNOWN.replace(lam=lam, recompute=r)
        for lam in (1e-4, 1e-3)
        for r in (16, 32, 64)
    }
    mlp |= {
        f"geo λ={lam:g} R={r}": geo.replace(lam=lam, recompute=r)
        for lam in (1e-5, 1e-4, 1e-3, 1e-2)
        for r in (4, 8, 16, 32)
    }
    g4 = geo.replace(lam=1e-4)
    mlp |= {"geo λ=1e-4 R=16 c=64": g4.replace(block=64), "geo λ=1e-4 R=16 c=256": g4.replace(block=256)}
    mlp |= {"geo λ=1e-4 R=16 m=256": g4.replace(m=256), "geo λ=1e-4 R=16 m=1024": g4.replace(m=1024)}
    mlp |= {
        "geo λ=1e-4 R=16 summed": g4.replace(joint=False),
        "geo λ=1e-4 R=32 summed": g4.replace(joint=False, recompute=32),
    }
    mlp |= {f"geo c=layer λ={lam:g} R=16": geo.replace(lam=lam, block=None) for lam in (1e-5, 1e-4, 1e-3, 1e-2)}
    mlp["geo c=layer λ=1e-4 R=8"] = geo.replace(lam=1e-4, block=None, recompute=8)
    lenet = {"best-known": BEST_KNOWN, "linear λ=1e-4 R=32": BEST_KNOWN.replace(lam=1e-4, recompute=32)}
    lenet |= {f"geo λ={lam:g} R=16": geo.replace(lam=lam) for lam in (1e-5, 1e-4, 1e-3)}
    lenet |= {"geo λ=1e-4 R=8": g4.replace(recompute=8), "geo λ=1e-4 R=32": g4.replace(recompute=32)}
    lenet |= {"geo λ=1e-4 R=16 c=256": g4.replace(block=256)}
    lenet |= {f"geo c=layer λ={lam:g} R=16": geo.replace(lam=lam, block=None) for lam in (1e-5, 1e-4)}
    print(settings_table(b, "mlp", seeds, mlp))
    print(settings_table(b, "lenet5", seeds, lenet))


def stage_confirm(b: Bench, models: list[str], seeds: list[int], extra: dict[str, Setting]) -> list[str]:
    """The table the issue asks for: defaults vs best-known, side by side, with the differences."""
    verdict = []
    for mk in models:
        settings = {"best-known": BEST_KNOWN, "default": DEFAULT, **ALTERNATIVES, **extra}
        print(settings_table(b, mk, seeds, settings))
        lines = []
        for s in SPARSITIES:
            bk, df = b.mean(mk, seeds, BEST_KNOWN, s), b.mean(mk, seeds, DEFAULT, s)
            best_label, best = max(((k, b.mean(mk, seeds, st, s)) for k, st in settings.items()), key=lambda kv: kv[1])
            ok = df >= best - TOLERANCE - 1e-12
            lines.append(
                [
                    f"{s:.0%}",
                    f"{bk:.3f}",
                    f"{df:.3f}",
                    f"{(df - bk) * 100:+.1f}",
                    f"{best:.3f} ({best_label})",
                    ("ok" if ok else "MISS") + ("" if s in BAR else " (reported only)"),
                ]
            )
            if s in BAR:
                verdict.append(f"{mk} {s:.0%}: {'ok' if ok else 'MISS'}")
        print(
            fmt_table(
                f"\n{mk}: defaults vs best-known (test accuracy, mean of {len(seeds)} seeds; bar: ≥ best − 0.5 points)",
                ["sparsity", "best-known", "default", "Δ points", "best of table", "within 0.5"],
                lines,
            )
        )
    return verdict


_KFAC = Setting("kfac", m=512, lam=1e-3, recompute=64, joint=False, block=None, schedule="geometric")
_DIAG = Setting("diag_fisher", m=512, lam=1e-4, recompute=16, joint=False, block=None, schedule="geometric")
#: the relative-λ candidates (λ = α × mean diag F̂): the digits models' mean diagonal is 2.6e-4 (LeNet-5) to 4.6e-4
#: (MLP), MiniLM's ~1e-8 (bench/hf_quality.py)
RELATIVE = {
    "rel α=0.1": DEFAULT.replace(lam=0.1, scale="relative"),
    "rel α=1": DEFAULT.replace(lam=1.0, scale="relative"),
    "rel/layer α=1": DEFAULT.replace(lam=1.0, scale="relative_layer"),
    # K-FAC (its default: absolute λ = 1e-3, R = 64, summed), where its absolute default missed the bar (80 %)
    **{f"kfac rel α={a:g}": _KFAC.replace(lam=a, scale="relative") for a in (0.1, 0.3, 1.0)},
}


def stage_relative(b: Bench, models: list[str], seeds: list[int], sps: list[float], settings: list[str]) -> None:
    """λ = α × mean diag F̂ (over all pruned weights, or per layer), at the other defaults (compare with the
    absolute default's row of the confirm stage)."""
    for mk in models:
        print(settings_table(b, mk, seeds, {k: RELATIVE[k] for k in settings or RELATIVE}, sps), flush=True)


def choose(b: Bench, mk: str, seed: int, sp: float, candidates: list[Setting], by: str = "accuracy") -> dict:
    """The candidate a calibration sweep picks: highest calibration accuracy, ties by lower calibration loss."""
    rows = [b.run(mk, seed, st, sp) for st in candidates]
    if by == "loss":  # the lowest calibration loss: the engine's rule until this wave
        return min(rows, key=lambda r: r["cal_loss"])
    if by == "smoothed loss":  # the lowest mean loss of a λ and its grid neighbours (tried, not the engine's: README)
        ordered = sorted(rows, key=lambda r: r["lam"])
        losses = [r["cal_loss"] for r in ordered]
        smooth = [statistics.fmean(losses[max(0, i - 1) : i + 2]) for i in range(len(losses))]
        return ordered[min(range(len(ordered)), key=lambda i: (smooth[i], losses[i]))]
    return max(rows, key=lambda r: (r["cal_acc"], -r["cal_loss"]))


def auto_lambda(
    b: Bench, mk: str, seed: int, sp: float, base: Setting, grid=LAMBDA_GRID, widen: int = 2, by: str = "accuracy"
) -> dict:
    """One-shot prune at the target per λ of the grid on the calibration split; while the best is on an edge of
    the grid, widen by two decades on that side (at most ``widen`` times)."""
    grid = sorted(grid)
    for _ in range(widen + 1):
        best = choose(b, mk, seed, sp, [base.replace(lam=lam) for lam in grid], by)
        if best["lam"] == grid[0]:
            grid = [grid[0] / 100, grid[0] / 10, *grid]
        elif best["lam"] == grid[-1]:
            grid = [*grid, grid[-1] * 10, grid[-1] * 100]
        else:
            break
    best = choose(b, mk, seed, sp, [base.replace(lam=lam) for lam in grid], by)
    return {**best, "grid": grid}


def stage_auto(b: Bench, models: list[str], seeds: list[int], all_sparsities: bool, auto_r: bool) -> None:
    for mk in models:
        lines, picks = [], []
        for sp in SPARSITIES if all_sparsities else AUTO_SPARSITIES[mk]:
            fixed = {lam: b.mean(mk, seeds, ABSOLUTE_DEFAULT.replace(lam=lam), sp) for lam in LAMBDA_GRID}
            best_lam = max(fixed, key=fixed.get)
            autos = [auto_lambda(b, mk, sd, sp, ABSOLUTE_DEFAULT) for sd in seeds]
            picks += [f"{sp:.0%}/s{a['seed']}: {a['lam']:g}" for a in autos]
            auto_acc = statistics.fmean(a["test_acc"] for a in autos)
            cost = statistics.fmean(
                sum(b.run(mk, a["seed"], ABSOLUTE_DEFAULT.replace(lam=lam), sp)["seconds"] for lam in a["grid"])
                for a in autos
            )
            lines.append(
                [
                    f"{sp:.0%}",
                    *[f"{fixed[lam]:.3f}" for lam in LAMBDA_GRID],
                    f"{fixed[best_lam]:.3f} (λ={best_lam:g})",
                    f"{fixed[ABSOLUTE_DEFAULT.lam]:.3f}",
                    f"{auto_acc:.3f}",
                    f"{cost:.1f}",
                ]
            )
        print(
            fmt_table(
                f"\n{mk}: fixed λ vs auto-λ on the calibration split (R={DEFAULT.recompute}, "
                f"{'joint' if DEFAULT.joint else 'summed'}, m={DEFAULT.m}; test accuracy, mean of {len(seeds)} seeds)",
                [
                    "sparsity",
                    *[f"λ={lam:g}" for lam in LAMBDA_GRID],
                    "best fixed",
                    f"absolute default λ={ABSOLUTE_DEFAULT.lam:g}",
                    "auto-λ",
                    "auto cost s",
                ],
                lines,
            )
        )
        print("  auto-λ picks:", ", ".join(picks))
        if not auto_r:
            continue
        # auto-R at the default λ: one-shot per R on the calibration split
        lines = []
        for sp in SPARSITIES if all_sparsities else AUTO_SPARSITIES[mk]:
            fixed = {r: b.mean(mk, seeds, DEFAULT.replace(recompute=r), sp) for r in R_GRID}
            autos = [choose(b, mk, sd, sp, [DEFAULT.replace(recompute=r) for r in R_GRID]) for sd in seeds]
            lines.append(
                [
                    f"{sp:.0%}",
                    *[f"{fixed[r]:.3f}" for r in R_GRID],
                    f"{statistics.fmean(a['test_acc'] for a in autos):.3f}",
                    " ".join(str(a["recompute"]) for a in autos),
                ]
            )
        print(
            fmt_table(
                f"\n{mk}: fixed R vs auto-R on the calibration split (λ={DEFAULT.lam:g}; test accuracy, mean of seeds)",
                ["sparsity", *[f"R={r}" for r in R_GRID], "auto-R", "picks"],
                lines,
            )
        )


OTHER = {  # method: (the old fixed default, λ grid, R grid), every R geometric (the engine's sub-steps)
    "kfac": (_KFAC, [1e-4, 1e-3, 1e-2], [16, 64]),  # K-FAC is cheap: R = 64 too
    "diag_fisher": (_DIAG, [1e-5, 1e-4, 1e-3], [4, 16]),
}
#: the λ = 'auto' grids the calibration sweep starts from (core.runs.spec: ABSOLUTE_GRID, and the relative candidate)
AUTO_ABSOLUTE = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
AUTO_RELATIVE = [1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0]  # half decades: kfac's best α lies between 1 and 10
#: R = 'auto': the R grid the one-shot sweep tries at the chosen λ (core.runs.spec: RECOMPUTE_GRID)
AUTO_R = [4, 16, 64]


def auto_setting(
    b: Bench, mk: str, seed: int, sp: float, base: Setting, scale: str, auto_r: bool, by: str = "accuracy"
) -> dict:
    """What the engine's ``lambda: auto`` (and ``recompute: auto``) picks on the calibration split: λ from the
    scale's grid at the base R (widened past a winning edge), then, with auto_r, R from :data:`AUTO_R` at that λ."""
    grid = AUTO_ABSOLUTE if scale == "absolute" else AUTO_RELATIVE
    row = auto_lambda(b, mk, seed, sp, base.replace(scale=scale), grid, by=by)
    prunes = len(row["grid"])
    if auto_r:
        chosen = base.replace(scale=scale, lam=row["lam"])
        row = choose(b, mk, seed, sp, [chosen.replace(recompute=r) for r in AUTO_R])
        prunes += len(AUTO_R) - (base.recompute in AUTO_R)
    return {**row, "prunes": prunes}


def other_grid(default: Setting, lams: list[float], rs: list[int]) -> dict[str, Setting]:
    """The method's own λ × R grid (the search of the previous wave also tried R = 1 and linear sub-steps, never
    better than geometric R = 16)."""
    return {f"λ={lam:g} R={r} geo": default.replace(lam=lam, recompute=r) for lam in lams for r in rs}


AUTO_VARIANTS = {  # label: (λ scale, auto R, ranked by)
    "auto abs": ("absolute", False, "accuracy"),
    "auto rel": ("relative", False, "accuracy"),
    "auto abs+R": ("absolute", True, "accuracy"),
    "auto rel+R": ("relative", True, "accuracy"),
    "auto abs by loss": ("absolute", False, "loss"),
    "auto abs by smoothed loss": ("absolute", False, "smoothed loss"),
}


def stage_other(
    b: Bench,
    models: list[str],
    seeds: list[int],
    methods: list[str],
    sps: list[float],
    variants: list[str],
    ref_seeds: list[int] | None = None,
) -> None:
    """kfac and diag_fisher: the old fixed default and the calibration sweeps (λ auto on an absolute or a relative
    grid, with or without R auto) against the best cell of the method's λ × R grid, chosen on test. With
    ``ref_seeds`` also against the cell chosen on those seeds' test splits (a setting known before these seeds are
    seen: the max over cells on the same seeds is biased up by their noise)."""
    for method in methods:
        default, lams, extra = OTHER[method]
        grid = other_grid(default, lams, extra)
        for mk in models:
            lines, picks = [], []
            for s in sps:
                vals = {k: b.mean(mk, seeds, st, s) for k, st in grid.items()}
                best = max(vals, key=vals.get)
                known = None
                if ref_seeds:
                    known = max(grid, key=lambda k: b.mean(mk, ref_seeds, grid[k], s))
                df = b.mean(mk, seeds, default, s)
                cells = [f"{df:.3f} ({(df - vals[best]) * 100:+.1f})"]
                for label in variants:
                    scale, auto_r, by = AUTO_VARIANTS[label]
                    autos = [auto_setting(b, mk, sd, s, default, scale, auto_r, by) for sd in seeds]
                    acc = statistics.fmean(a["test_acc"] for a in autos)
                    cells.append(f"{acc:.3f} ({(acc - vals[best]) * 100:+.2f})")
                    if known is not None:
                        cells[-1] += f" [{(acc - vals[known]) * 100:+.2f} to known]"
                    cost = statistics.fmean(a["prunes"] for a in autos)
                    picks.append(
                        f"{label} {s:.0%}: "
                        + ", ".join(f"λ={a['lam']:g} R={a['recompute']}" for a in autos)
                        + f" ({cost:.1f} prunes)"
                    )
                lines.append([f"{s:.0%}", *cells, f"{vals[best]:.3f} ({best})"])
                if known is not None:
                    lines[-1].append(f"{vals[known]:.3f} ({known})")
                print(f"  {mk} {method} {s:.0%}: " + " | ".join(lines[-1]), flush=True)
            print(
                fmt_table(
                    f"\n{mk} {method}: fixed default ({default.label()}) and calibration sweeps vs the best of its "
                    f"λ × R grid on test (test accuracy, mean of {len(seeds)} seeds; Δ points to the best)",
                    ["sparsity", "old default", *variants, "best of grid"]
                    + ([f"cell chosen on seeds {','.join(map(str, ref_seeds))}"] if ref_seeds else []),
                    lines,
                )
            )
            print("  picks:", "; ".join(picks), flush=True)


def stage_cost(b: Bench, models: list[str]) -> list[dict]:
    rows = []
    for mk in models:
        c = b.case(mk, 0)
        settings = {"best-known": BEST_KNOWN, "default": DEFAULT, "kfac": OTHER["kfac"][0]}
        settings["diag_fisher"] = OTHER["diag_fisher"][0]
        for label, st in settings.items():
            times = []
            for _ in range(3):
                c.model.load_state_dict(c.state)
                t = time.perf_counter()
                prune(st, c, 0.9, 0)
                times.append(time.perf_counter() - t)
            rows.append({"stage": "cost", "model": mk, "setting": label, "seconds_min": min(times), "seconds": times})
            each = [round(t, 2) for t in times]
            print(f"cost {mk:7} {label:12} one-shot prune to 90 %: min {min(times):.2f} s of {each} ({st.label()})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--stages", default="confirm,other,cost")
    ap.add_argument("--auto-all", action="store_true", help="auto-λ at every sparsity on every model (slow)")
    ap.add_argument("--auto-r", action="store_true", help="also choose R on the calibration split (R × cost)")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="the relative and other stages'")
    ap.add_argument("--relative", default="", help="the relative stage's settings (default: all of RELATIVE)")
    ap.add_argument("--methods", default=",".join(OTHER), help="the other stage's methods")
    ap.add_argument("--variants", default=",".join(AUTO_VARIANTS), help="the other stage's calibration sweeps")
    ap.add_argument("--ref-seeds", default="", help="the other stage: also compare with the grid cell best on these")
    ap.add_argument("--cache", help="pickle memoising prunes across runs (same code, same results; off by default)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    models, seeds, stages = args.models.split(","), list(range(args.seeds)), args.stages.split(",")
    b, extra_rows, verdict = Bench(), [], []
    if args.cache and Path(args.cache).exists():
        with open(args.cache, "rb") as f:  # keys rebuilt with this module's Setting (run as a script or imported)
            b.results = {(mk, sd, Setting(**vars(st)), sp): r for (mk, sd, st, sp), r in pickle.load(f).items()}
    t0 = time.perf_counter()
    if "search" in stages:
        stage_search(b, models)
    if "explore" in stages:
        stage_explore(b, seeds)
    if "confirm" in stages:
        verdict = stage_confirm(b, models, seeds, {})
    if "relative" in stages:
        sps = [float(x) for x in args.sparsities.split(",")]
        stage_relative(b, models, seeds, sps, [x for x in args.relative.split(",") if x])
    if "auto" in stages:
        stage_auto(b, models, seeds, args.auto_all, args.auto_r)
    if "other" in stages:
        sps = [s for s in BAR if s in [float(x) for x in args.sparsities.split(",")]]
        ref = [int(x) for x in args.ref_seeds.split(",") if x]
        stage_other(b, models, seeds, args.methods.split(","), sps, args.variants.split(","), ref)
    if "cost" in stages:
        extra_rows = stage_cost(b, models)
    if verdict:
        print("\nbar (defaults within 0.5 points of the best known, 50–90 %):", "; ".join(verdict))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.cache:
        with open(args.cache, "wb") as f:
            pickle.dump(b.results, f)
    print("saved", save("defaults-" + "-".join(stages), [{"stage": "prune", **r} for r in b.rows()] + extra_rows))


if __name__ == "__main__":
    main()
