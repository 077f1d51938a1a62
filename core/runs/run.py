"""A run: spec + model + data → pruned model, masks, metrics curve and report.

The same code serves the CLI, the workers, the benches and the tests. It talks to its caller only
through ``RunHooks`` (progress, metric points, events, cancellation) and a ``Checkpointer``; it
checkpoints after every pruning step and every fine-tuning epoch, and a resumed run ends with the
same weights as an uninterrupted one (all randomness is keyed by seed and epoch).

A run never ends "succeeded" with non-finite numbers: the weights are checked after every pruning step and every
epoch, the losses whenever they are evaluated, and the first NaN or ±Infinity stops the run with a
:class:`core.errors.NumericalError` that says where (:mod:`core.runs.numerics`). Everything it writes as JSON
(report, checkpoint metadata, events) is strict JSON. Its memory plan is fitted to the lower of the spec's and the
server's budget before any work (:mod:`core.runs.budget`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from core.engine.activations import saved_bytes_per_sample
from core.engine.layerwise.sequential import LayerwiseConfig
from core.engine.layout import select_parameters
from core.engine.memory import MemoryPlan
from core.engine.methods import method_info
from core.engine.phases import reporting
from core.engine.pruner import make_pruner
from core.errors import Canceled, InvalidInput, NumericalError
from core.io.compressed import write_compressed
from core.io.data import Dataset
from core.io.files import atomic_write
from core.io.model_files import save_state_dict
from core.runs.budget import memory_plan
from core.runs.checkpoint import Checkpointer, optimizer_state, restore_optimizer
from core.runs.numerics import TRAIN_HINT, check_metrics, check_weights, json_bytes, json_safe, prune_hint
from core.runs.patterns import check_pattern, pattern_report
from core.runs.phases import PeakMemory, PhaseTimer
from core.runs.report import count_macs, curve_csv, curve_png, lambda_sweep_png, plot_title, quadratic_png
from core.runs.schedule import pruning_events
from core.runs.sizes import compressed_format, dense_safetensors_bytes, size_report
from core.runs.spec import LAMBDA_MAX, LAMBDA_MIN, PruneSpec, Update
from core.runs.speed import (
    ORT_CPU,
    LatencyConfig,
    default_latency,
    measure,
    measure_dense_onnx,
    runtimes_for,
    speed_report,
)
from core.runs.structured import execute_structured
from core.runs.train import apply_masks, evaluate, learning_rate, make_optimizer, train_epoch

log = logging.getLogger(__name__)
#: λ or R = 'auto': the calibration split is this fraction of the training examples, at most CALIBRATION_MAX of them
CALIBRATION_FRACTION = 0.1
CALIBRATION_MAX = 2048
#: times the λ grid is widened (two decades past the edge) when the best λ sits on its edge
LAMBDA_WIDENINGS = 2
ARTIFACTS = {
    "pruned": "pruned.safetensors",
    "masks": "masks.safetensors",
    "compressed": "compressed.safetensors",  # compressed-tensors' sparse-bitmask (2:4: sparse-24-bitmask) format
    "onnx": "model.onnx",
    "report": "report.json",
    "curve_csv": "curve.csv",
    "curve_png": "curve.png",
    "quadratic_png": "quadratic.png",  # predicted vs actual loss change per pruning step (methods with a curvature)
    "lambda_sweep_png": "lambda_sweep.png",  # λ = 'auto' only
}


class RunHooks:
    """What a run tells its caller. The defaults do nothing; the CLI and the worker override."""

    def progress(self, fraction: float, message: str) -> None: ...

    def metric(self, point: dict) -> None: ...

    def event(self, kind: str, data: dict) -> None: ...

    def cancelled(self) -> bool:
        return False


@dataclass
class RunResult:
    artifacts: dict[str, Path]
    report: dict


@dataclass
class _State:
    """Everything a checkpoint restores besides tensors."""

    cursor: tuple[int, int] = (-1, 1)  # (epoch, phase) last completed; phase 0 pruned, 1 trained
    lam: float | None = None
    curve: list[dict] = field(default_factory=list)
    fidelity: list[dict] = field(default_factory=list)
    before: dict = field(default_factory=dict)
    lambda_sweep: list[dict] = field(default_factory=list)
    recompute: int | None = None  # R = 'auto': the one chosen
    recompute_sweep: list[dict] = field(default_factory=list)
    lambda_effective: float | dict | None = None  # the absolute λ of the first estimate (relative λ resolved)
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # seconds per phase (core.runs.phases), over every attempt
    dense: dict = field(default_factory=dict)  # the dense model before pruning: shapes, safetensors bytes, latency


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device 'cuda' requested but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def calibration_size(num_train: int) -> int:
    """Examples :func:`calibration_split` takes out of ``num_train`` training examples."""
    return min(CALIBRATION_MAX, max(1, round(num_train * CALIBRATION_FRACTION)))


def calibration_split(x: Tensor, y: Tensor, seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((training, its labels), (calibration, its labels)): :func:`calibration_size` of the training examples held
    out, by a permutation seeded with the run's seed, for what a run chooses itself (λ or R = 'auto')."""
    n = len(x)
    n_cal = calibration_size(n)
    if n_cal >= n:
        raise InvalidInput(
            f"lambda 'auto' holds out {n_cal} of the {n} training example(s) to choose λ and keeps none to train on",
            errors=[{"loc": ["spec", "fisher", "lambda"], "msg": "too few training examples for 'auto'"}],
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 1))
    cal, train = perm[:n_cal].sort().values, perm[n_cal:].sort().values
    return (x[train], y[train]), (x[cal], y[cal])


def sweep_rank(entry: dict) -> float:
    """A sweep entry's rank, lowest best: its loss on the calibration split, whatever the job's metric. On a few
    hundred calibration examples accuracy moves in steps of one example and ties across a flat λ range, so a pick
    by accuracy is noise there (README, Defaults: it missed the bar by up to 0.3 points where the loss met it)."""
    return entry["loss"]


def effective_lambda(pruner) -> float | dict[str, float] | None:
    """The absolute λ of a pruner's first estimate (a relative λ resolved against its Fisher's mean diagonal): one
    number when every layer has the same, else per layer; None when the method uses none (layer-wise)."""
    lambdas = getattr(pruner.log[0], "lambdas", {}) if getattr(pruner, "log", None) else {}
    if not lambdas:
        return None
    values = set(lambdas.values())
    return values.pop() if len(values) == 1 else dict(lambdas)


def pruned_names(model: nn.Module, spec: PruneSpec) -> list[str]:
    names = select_parameters(model, spec.layers.include, spec.layers.exclude)
    if spec.layers.keep_first_dense:
        names = names[1:]
    if spec.layers.keep_last_dense:
        names = names[:-1]
    if not names:
        raise InvalidInput(
            "no parameter selected for pruning", errors=[{"loc": ["spec", "layers"], "msg": "empty selection"}]
        )
    return names


class Run:
    """One execution of a spec; ``execute()`` runs or resumes it to completion."""

    def __init__(
        self,
        spec: PruneSpec,
        model: nn.Module,
        data: Dataset,
        out_dir: Path,
        hooks: RunHooks | None = None,
        checkpointer: Checkpointer | None = None,
        *,
        memory_budget_mb: float | None = None,
        model_name: str | None = None,
        phases: PhaseTimer | None = None,
        latency: LatencyConfig | None = None,
    ):
        """``memory_budget_mb``: the server's budget (``Settings.memory_budget_mb``), if any; the lower of it and
        the spec's applies. ``model_name`` titles the plots (default: the module's class name). ``phases``: a timer
        that already holds the caller's phases (the inputs' loading). ``latency``: what the speed measurement may spend
        (``Settings.latency_budget_s``; :mod:`core.runs.speed`)."""
        self.latency = latency or default_latency()
        self._dense_weights: dict[str, Tensor] | None = None  # the pruned layers' dense weights, for the dense ONNX
        self.timer = phases or PhaseTimer()
        self.peak = PeakMemory()
        self.spec, self.hooks, self.ckpt = spec, hooks or RunHooks(), checkpointer
        self.model_name = model_name or type(model).__name__
        self.out_dir = Path(out_dir)
        self.device = resolve_device(spec.device)
        self.dtype = torch.float64 if spec.dtype == "float64" else torch.float32
        self.model = model.to(self.device, self.dtype)
        data = data if data.has_val else data.split(spec.val_fraction, spec.seed)
        x, y = data.x_train, data.y_train
        #: methods without gradients (magnitude) use no λ and no Fisher memory; they sweep nothing
        self.curvature = method_info(spec.method).needs_gradients
        self.xc = self.yc = None
        if spec.calibrates:  # λ (R) 'auto' is chosen on its own split, out of the training data
            (x, y), (xc, yc) = calibration_split(x, y, spec.seed)
            self.xc, self.yc = self._put(xc, yc)
        self.x, self.y = self._put(x, y)
        self.spec = spec = spec.resolved(len(self.x))  # fisher.samples by default: as many as the data allows
        self.xv, self.yv = self._put(data.x_val, data.y_val)
        self.names = pruned_names(self.model, spec)
        params = dict(self.model.named_parameters())
        self.masks = {n: torch.ones_like(params[n]) for n in self.names}
        self.events = pruning_events(spec)
        self.epochs = spec.finetune.epochs
        self.optimizer = make_optimizer(self.model, spec.finetune) if self.epochs else None
        need = spec.fisher_examples
        if need > len(self.x):
            raise InvalidInput(
                f"fisher.samples × fisher.batch_size = {need} exceeds the {len(self.x)} training examples",
                errors=[{"loc": ["spec", "fisher", "samples"], "msg": "larger than the training split"}],
            )
        shapes = {n: tuple(params[n].shape) for n in self.names}
        check_pattern(spec, shapes)
        activations = None
        if self.curvature:  # what a gradient chunk's samples save for the backward, counted on the meta device
            activations = saved_bytes_per_sample(self.model, self.x[: spec.fisher.batch_size], self.names)
        self.plan: MemoryPlan = memory_plan(spec, shapes, memory_budget_mb, activations)
        self.state = _State()
        self._units = len(self.events) + self.epochs + 1

    def _put(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(self.device, self.dtype if x.is_floating_point() else x.dtype)
        y = y.to(self.device, self.dtype if y.is_floating_point() else y.dtype)
        return x, y

    # -- pieces ---------------------------------------------------------------------------------
    def _pruner(self, lam: float, seed: int, recompute: int | None = None):
        """The engine's pruner at ``lam``; R the given one, else the chosen (R 'auto') or the spec's."""
        spec = self.spec
        fisher = spec.fisher_config(lam, seed)
        if self.plan.path is not None:  # the plan's choice of path, chunk size and layer groups (core.engine.memory)
            fisher = dataclasses.replace(fisher, path=self.plan.path, chunk=self.plan.chunk, groups=self.plan.groups)
        return make_pruner(
            spec.method,
            fisher,
            block_size=self.plan.block_size,
            scope=spec.scope,
            joint=spec.fisher.update is Update.JOINT,
            recompute=recompute or self._recompute(),
            dtype=self.dtype,
            pattern=spec.pattern,
            layerwise=LayerwiseConfig(
                spec.layerwise.damp,
                spec.layerwise.block_size,
                spec.layerwise.batch_size,
                spec.fisher_samples(None),
                seed,
            ),
        )

    def _lam(self) -> float:
        """The λ the engine gets: the chosen one, or (for methods that use none, reported as null) the spec's."""
        if self.state.lam is not None:
            return self.state.lam
        return self.spec.fisher.damping if self.spec.fisher.damping != "auto" else 1.0

    def _recompute(self) -> int:
        """R: the spec's, the one chosen for 'auto', or, while λ is swept before R is chosen, the method's default."""
        if self.spec.fisher.recompute != "auto":
            return self.spec.fisher.recompute
        return self.state.recompute or method_info(self.spec.method).default_recompute

    def _plan_dict(self) -> dict | None:
        """The memory plan of the Fisher estimate; None for methods that estimate none."""
        return self.plan.as_dict() if self.curvature else None

    def _splits(self) -> dict:
        """Every split a metric of the report is measured on: its name and size (keys as in ``metrics``)."""
        splits = {
            "train": {"name": "train", "examples": len(self.x)},
            "validation": {"name": "validation", "examples": len(self.xv)},
        }
        if self.xc is not None:
            used = [
                f"{k} 'auto'"
                for k, v in (("lambda", self.spec.fisher.damping), ("recompute", self.spec.fisher.recompute))
                if v == "auto"
            ]
            splits["calibration"] = {"name": "calibration", "examples": len(self.xc), "used_for": " and ".join(used)}
        return splits

    def _metric(self, x: Tensor, y: Tensor) -> dict[str, float]:
        with self.timer("evaluation"):
            return evaluate(self.model, x, y, self.spec.loss)

    def _score(self, m: dict) -> float:
        return m["accuracy"] if self.spec.metric == "accuracy" else m["loss"]

    def _sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(float(m.sum()) for m in self.masks.values()) / total

    def _check_cancel(self) -> None:
        if self.hooks.cancelled():
            raise Canceled("the run was canceled; its last checkpoint is kept")

    def _event(self, kind: str, data: dict) -> None:
        self.hooks.event(kind, json_safe(data))  # strict JSON for every hook: non-finite numbers as null

    def _progress(self, unit: float, message: str) -> None:
        self.hooks.progress(min(unit / self._units, 1.0), message)

    def _point(self, step: int, epoch: int, kind: str, metrics: dict, started: float) -> None:
        point = {
            "step": step,
            "epoch": epoch,
            "kind": kind,
            "sparsity": self._sparsity(),
            "loss": metrics["loss"],
            "metric": self._score(metrics),
            "split": "validation",
            "seconds": self.state.seconds + time.perf_counter() - started,
        }
        self.state.curve.append(point)
        self.hooks.metric(point)

    def _choose_lambda(self) -> float:
        """λ = 'auto': one-shot prune a copy to the first target per λ of ``fisher.lambda_grid`` and keep the best on
        the *calibration* split (carved out of the training data, :func:`calibration_split`; never the validation
        split whose metric the job reports), ranked by :func:`sweep_rank` (the calibration loss). When the best
        λ sits on an edge of what was tried, the grid is widened by two decades past that edge (×10 steps), at most
        :data:`LAMBDA_WIDENINGS` times. A λ whose prune goes non-finite is recorded (score null, with the reason)
        and never chosen; if every λ does, the run fails with a :class:`NumericalError`. Deterministic: every
        candidate prunes with the run's seed."""
        first = self.events[min(self.events)]
        results: list[dict] = []
        failures: list[str] = []
        original = copy.deepcopy(self.model.state_dict())
        grid = list(dict.fromkeys(self.spec.fisher.lambda_grid))

        def best() -> dict | None:
            scored = [r for r in results if r["score"] is not None]
            return min(scored, key=sweep_rank) if scored else None

        def sweep(lams: list[float], widened: bool) -> None:
            for lam in lams:
                self._check_cancel()
                effective = None
                try:
                    where = f"the λ sweep's prune with λ = {lam:g}"
                    pruner, _ = self._prune_numerically(lam, self.spec.seed, first, where)
                    effective = effective_lambda(pruner)
                    metrics = self._metric(self.xc, self.yc)
                    check_metrics(metrics, where, prune_hint(lam))
                    score, loss, reason = self._score(metrics), metrics["loss"], None
                except NumericalError as e:
                    score, loss, reason = None, None, e.detail
                    failures.append(f"λ = {lam:g}: {e.detail}")
                results.append(
                    {
                        "lambda": lam,
                        "lambda_scale": self.spec.fisher.lambda_scale,
                        "lambda_effective": effective,
                        "sparsity": first,
                        "split": "calibration",
                        "metric": self.spec.metric,
                        "score": score,
                        self.spec.metric: score,
                        "loss": loss,
                        "error": reason,
                        "widened": widened,
                    }
                )
                self.model.load_state_dict(original)
                self.hooks.progress(0.0, f"lambda sweep {len(results)}/{len(grid)}+")

        sweep(grid, False)
        for _ in range(LAMBDA_WIDENINGS if len(grid) > 1 else 0):
            top = best()
            tried = [r["lambda"] for r in results]
            if top is None:
                break
            if top["lambda"] == min(tried):
                more = [float(f"{min(tried) / 10**k:.6g}") for k in (1, 2)]
            elif top["lambda"] == max(tried):
                more = [float(f"{max(tried) * 10**k:.6g}") for k in (1, 2)]
            else:
                break
            more = [lam for lam in more if LAMBDA_MIN <= lam <= LAMBDA_MAX and lam not in tried]
            if not more:
                break
            sweep(more, True)
        top = best()
        if top is None:
            raise NumericalError(
                "every λ of fisher.lambda_grid gave non-finite numbers (" + "; ".join(failures)[:1500] + "); "
                "try larger values",
                errors=[{"loc": ["spec", "fisher", "lambda_grid"], "msg": "no usable λ", "type": "non_finite"}],
            )
        self.state.lambda_sweep = json_safe(results)
        self._event(
            "lambda_chosen",
            {
                "lambda": top["lambda"],
                "lambda_scale": self.spec.fisher.lambda_scale,
                "lambda_effective": top["lambda_effective"],
                "split": "calibration",
                "widened": top["widened"],
                "sweep": results,
            },
        )
        return top["lambda"]

    def _choose_recompute(self, lam: float) -> int:
        """R = 'auto': as :meth:`_choose_lambda`, one-shot prune a copy to the first target at the chosen ``lam`` per
        R of :meth:`PruneSpec.recompute_grid` and keep the best on the *calibration* split (ties: the smaller R, the
        cheaper). The R the λ sweep ran at is not pruned again: its score at ``lam`` is taken from that sweep (the
        same prune: same λ, R, target and seed). A prune that goes non-finite is recorded and never chosen."""
        first = self.events[min(self.events)]
        swept = {r["lambda"]: r for r in self.state.lambda_sweep}
        at = self._recompute()  # the R the λ sweep ran at (the method's default)
        original = copy.deepcopy(self.model.state_dict())
        results: list[dict] = []
        for r in self.spec.recompute_grid():
            self._check_cancel()
            entry = {"recompute": r, "lambda": lam, "sparsity": first, "split": "calibration"}
            if r == at and lam in swept:
                score, loss, reason, reused = swept[lam]["score"], swept[lam]["loss"], swept[lam]["error"], True
            else:
                reused = False
                try:
                    where = f"the R sweep's prune with R = {r} (λ = {lam:g})"
                    self._prune_numerically(lam, self.spec.seed, first, where, recompute=r)
                    metrics = self._metric(self.xc, self.yc)
                    check_metrics(metrics, where, prune_hint(lam))
                    score, loss, reason = self._score(metrics), metrics["loss"], None
                except NumericalError as e:
                    score, loss, reason = None, None, e.detail
                self.model.load_state_dict(original)
            results.append(
                {
                    **entry,
                    "metric": self.spec.metric,
                    "score": score,
                    self.spec.metric: score,
                    "loss": loss,
                    "error": reason,
                    "from_lambda_sweep": reused,
                }
            )
            self.hooks.progress(0.0, f"recompute sweep {len(results)}/{len(self.spec.recompute_grid())}")
        scored = [r for r in results if r["score"] is not None]
        if not scored:
            raise NumericalError(
                f"every R of {self.spec.recompute_grid()} gave non-finite numbers at λ = {lam:g}; try a larger lambda",
                errors=[{"loc": ["spec", "fisher", "recompute"], "msg": "no usable R", "type": "non_finite"}],
            )
        top = min(scored, key=sweep_rank)  # ties: the first, the smaller R
        self.state.recompute_sweep = json_safe(results)
        self._event("recompute_chosen", {"recompute": top["recompute"], "split": "calibration", "sweep": results})
        return top["recompute"]

    def _prune_numerically(self, lam: float, seed: int, target: float, where: str, **kwargs):
        """A pruner's ``prune`` to ``target`` at ``lam``, with a failed factorization (a block, or a K-FAC factor, that
        is not positive definite at this λ) and non-finite weights turned into a :class:`NumericalError` that says
        ``where`` and what to change."""
        pruner = self._pruner(lam, seed, kwargs.pop("recompute", None))
        try:
            with self.peak.section():  # the step's own peak: what the memory plan predicts
                masks = pruner.prune(self.model, self.names, target, (self.x, self.y), **kwargs)
        except (torch.linalg.LinAlgError, NumericalError) as e:
            detail = e.detail if isinstance(e, NumericalError) else str(e).split("\n")[0]
            raise NumericalError(
                f"{where} failed to factor the curvature: {detail}; {prune_hint(lam)}",
                errors=[{"loc": ["spec", "fisher", "lambda"], "msg": "not positive definite", "type": "numerical"}],
            ) from e
        check_weights(self.model, where, prune_hint(lam))
        return pruner, masks

    # -- checkpoints ----------------------------------------------------------------------------
    def _save(self, cursor: tuple[int, int], started: float) -> None:
        self.state.cursor = cursor
        if self.ckpt is None:
            return
        with self.timer("checkpoint"):
            self._save_checkpoint(started)

    def _save_checkpoint(self, started: float) -> None:
        self.state.phases = dict(self.timer.seconds)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"mask.{k}": v for k, v in self.masks.items()})
        meta = {"state": {**self.state.__dict__, "seconds": self.state.seconds + time.perf_counter() - started}}
        if self.optimizer:
            opt_tensors, meta["optimizer"] = optimizer_state(self.optimizer)
            tensors.update(opt_tensors)
        self.ckpt.save(tensors, json.loads(json_bytes(meta)))
        cursor = self.state.cursor
        self._event("checkpoint", {"epoch": cursor[0], "phase": ["pruned", "trained"][cursor[1]]})

    def _resume(self) -> bool:
        loaded = self.ckpt.load() if self.ckpt else None
        if loaded is None:
            return False
        tensors, meta = loaded
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_sd)
        self.masks = {k[5:]: v.to(self.device) for k, v in tensors.items() if k.startswith("mask.")}
        if self.optimizer and "optimizer" in meta:
            restore_optimizer(self.optimizer, tensors, meta["optimizer"])
        st = meta["state"]
        st["cursor"] = tuple(st["cursor"])
        if "val" in st["before"]:  # a checkpoint written before the split was named in full
            st["before"]["validation"] = st["before"].pop("val")
        self.state = _State(**st)
        self.timer.merge(self.state.phases)  # the earlier attempts' phases (the checkpoint's own time is not in them)
        self._event("resumed", {"epoch": st["cursor"][0], "phase": st["cursor"][1]})
        return True

    # -- the run --------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        self.peak.start()
        with reporting(self.timer):  # the engine's sub-phases (core.engine.phases) go to the same timer
            return self._execute()

    def _execute(self) -> RunResult:
        started = time.perf_counter()
        if not self._resume():
            self._dense_baseline()
            self.state.before = {"validation": self._metric(self.xv, self.yv), "train": self._metric(self.x, self.y)}
            for split, metrics in self.state.before.items():
                check_metrics(
                    metrics,
                    f"before any pruning, on the {split} split",
                    "the model's outputs overflow on this data: check the scale of its weights and of the inputs",
                )
            if not self.curvature:
                self.state.lam = None  # reported as null: the method uses no λ
            elif self.spec.fisher.damping == "auto":
                with self.timer("lambda_sweep"):
                    self.state.lam = self._choose_lambda()
            else:
                self.state.lam = self.spec.fisher.damping
            if self.curvature and self.spec.fisher.recompute == "auto":
                with self.timer("recompute_sweep"):
                    self.state.recompute = self._choose_recompute(self.state.lam)
            self._point(0, 0, "dense", self.state.before["validation"], started)
        scale = self.spec.fisher.lambda_scale if self.curvature else None
        recompute = self._recompute() if self.curvature else None
        self._event(
            "started",
            {"lambda": self.state.lam, "lambda_scale": scale, "recompute": recompute, "memory_plan": self._plan_dict()},
        )
        fidelity_idx = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.spec.seed))[:2048]
        fx, fy = self.x[fidelity_idx.to(self.device)], self.y[fidelity_idx.to(self.device)]
        step = len(self.state.curve) - 1
        for epoch in range(max(self.epochs, 1)):
            if epoch in self.events and (epoch, 0) > self.state.cursor:
                self._check_cancel()
                step += 1
                self._prune(epoch, step, fx, fy, started)
                self._save((epoch, 0), started)
            if self.epochs and (epoch, 1) > self.state.cursor:
                self._check_cancel()
                step += 1
                self._train(epoch, step, started)
                self._save((epoch, 1), started)
        self.state.seconds += time.perf_counter() - started
        return self._finish()

    def _prune(self, epoch: int, step: int, fx: Tensor, fy: Tensor, started: float) -> None:
        target = self.events[epoch]
        unit = sum(1 for e in self.events if e < epoch) + epoch
        self._progress(unit, f"pruning to {target:.1%}")
        with self.timer("evaluation"):
            before = evaluate(self.model, fx, fy, self.spec.loss)["loss"]
        lam = self._lam()
        where = f"pruning step {step} (epoch {epoch}, to sparsity {target:.4g}" + (
            f", λ = {lam:g})" if self.curvature else ")"
        )
        pruner, self.masks = self._prune_numerically(
            lam,
            self.spec.seed * 1000 + epoch,
            target,
            where,
            masks=self.masks,
            progress=lambda f: self._progress(unit + f, f"pruning to {target:.1%}"),
        )
        with self.timer("evaluation"):
            after = evaluate(self.model, fx, fy, self.spec.loss)["loss"]
        check_metrics({"loss": after}, where, prune_hint(lam))
        predicted = sum(s.predicted_loss_change for s in pruner.log)
        effective = effective_lambda(pruner) if self.curvature else None
        if self.state.lambda_effective is None:
            self.state.lambda_effective = effective
        self.state.fidelity.append(
            {
                "step": step,
                "sparsity": target,
                "predicted_loss_change": predicted,
                "actual_loss_change": after - before,
                "lambda_effective": effective,
            }
        )
        metrics = self._metric(self.xv, self.yv)
        check_metrics(metrics, where, prune_hint(lam))
        self._point(step, epoch, "prune", metrics, started)
        self._event("pruned", {"step": step, "sparsity": self._sparsity()})

    def _train(self, epoch: int, step: int, started: float) -> None:
        ft = self.spec.finetune
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(ft, epoch)
        torch.manual_seed(self.spec.seed * 1000 + epoch)  # dropout etc.
        unit = sum(1 for e in self.events if e <= epoch) + epoch

        def on_batch(b: int, n: int) -> None:
            self._check_cancel()
            self._progress(unit + b / n, f"fine-tuning epoch {epoch + 1}/{self.epochs}")

        with self.timer("finetune"):
            self._train_epoch(epoch, on_batch)
        where = f"fine-tuning epoch {epoch + 1}/{self.epochs} (step {step}, lr {learning_rate(ft, epoch):g})"
        check_weights(self.model, where, TRAIN_HINT)
        metrics = self._metric(self.xv, self.yv)
        check_metrics(metrics, where, TRAIN_HINT)
        self._point(step, epoch, "epoch", metrics, started)

    def _train_epoch(self, epoch: int, on_batch) -> None:
        ft = self.spec.finetune
        train_epoch(
            self.model,
            self.x,
            self.y,
            self.optimizer,
            loss=self.spec.loss,
            batch_size=ft.batch_size,
            masks=self.masks,
            generator=torch.Generator().manual_seed(self.spec.seed * 7919 + epoch),
            on_batch=on_batch,
        )

    def _finish(self) -> RunResult:
        apply_masks(self.model, self.masks)
        check_weights(self.model, "the final masking", prune_hint(self._lam()))
        after = {"validation": self._metric(self.xv, self.yv), "train": self._metric(self.x, self.y)}
        for split, metrics in after.items():
            check_metrics(metrics, f"the pruned model, on the {split} split", prune_hint(self._lam()))
        model = self.model.to("cpu", torch.float32).eval()
        masks = {k: v.to("cpu", torch.float32) for k, v in self.masks.items()}
        example = self.xv[:1].to("cpu", torch.float32) if self.xv.is_floating_point() else self.xv[:1].cpu()
        skip = set() if self.curvature else {"quadratic_png"}  # magnitude has no quadratic model to check
        skip |= set() if self.state.lambda_sweep else {"lambda_sweep_png"}
        out = {k: self.out_dir / v for k, v in ARTIFACTS.items() if k not in skip}
        with self.timer("export"):
            out, onnx_error = self._export(model, masks, example, out)
            size = self._compress(model, masks, out)
        speed = self._speed(model, out)
        report = json_safe({**self._report(model, masks, example, after, onnx_error), "speed": speed, "size": size})
        atomic_write(out["curve_csv"], curve_csv(self.state.curve).encode())
        self._plots(out)
        atomic_write(out["report"], json_bytes(report, indent=2))
        self.hooks.progress(1.0, "done")
        return RunResult(out, report)

    def _export(self, model: nn.Module, masks: dict, example: Tensor, out: dict) -> tuple[dict, str | None]:
        """The pruned weights and the masks (under the upload's own names), the model's own format where it has one
        (``hf_model.zip``), and, unless the spec's ``export.onnx`` is false, the ONNX graph (of a Hugging Face model:
        its adapter, the one tensor of token ids and attention mask in, as the run feeds it); (the artifacts written,
        why ONNX failed or None)."""
        names = getattr(self.model, "source_names", None) or {}  # an ONNX upload's own names (core.io.onnx)
        save_state_dict({names.get(k, k): v for k, v in model.state_dict().items()}, out["pruned"])
        save_state_dict({names.get(k, k): v for k, v in masks.items()}, out["masks"])
        onnx_error = None
        export = getattr(model, "export_artifacts", None)  # a model with its own format (core.io.hf: hf_model.zip)
        if export is not None:
            out |= export(self.out_dir, masks)
        if not self.spec.export.onnx:
            return {k: v for k, v in out.items() if k != "onnx"}, None
        try:
            from core.io.onnx.export import export_onnx

            export_onnx(model, example, out["onnx"])
        except Exception as e:  # noqa: BLE001 (the run's weights are still good; say why in the report)
            log.warning("ONNX export failed: %s", e)
            onnx_error, out = str(e), {k: v for k, v in out.items() if k != "onnx"}
        return out, onnx_error

    # -- latency and size (core.runs.speed, core.runs.sizes) --------------------------------------
    def _runtimes(self) -> list[str]:
        return runtimes_for(self.spec.pattern, self.spec.export.onnx)

    def _dense_baseline(self) -> None:
        """The dense model's shapes, safetensors bytes and latency, measured before any pruning (kept in the state, so
        a resumed run reports them); the pruned layers' dense weights are kept for the dense ONNX graph."""
        state = {k: v.detach() for k, v in self.model.state_dict().items()}
        names = getattr(self.model, "source_names", None) or {}
        self.state.dense = {"shapes": {k: list(v.shape) for k, v in state.items()}}
        with self.timer("export"):
            cpu = {names.get(k, k): v.to("cpu", torch.float32) for k, v in state.items()}
            self.state.dense["safetensors_bytes"] = dense_safetensors_bytes(cpu, self.out_dir / ".dense.safetensors")
        if not self.latency.enabled:
            return
        runtimes = self._runtimes()
        with self.timer("latency"):
            here = self.device.type == "cpu" and self.dtype == torch.float32
            model = self.model if here else copy.deepcopy(self.model).to("cpu", torch.float32)
            now = [r for r in runtimes if r != ORT_CPU]  # the dense ONNX graph exists only once the pruned one does
            self.state.dense["latency"] = measure(model, self.xv, self.latency, now, dense=True, share_of=runtimes)
        if ORT_CPU in runtimes:
            self._dense_weights = {n: state[n].to("cpu", torch.float32).clone() for n in self.names}

    def _compress(self, model: nn.Module, masks: dict, out: dict) -> dict:
        """Write ``compressed.safetensors`` (same names as ``pruned.safetensors``); the report's ``size`` section."""
        names = getattr(self.model, "source_names", None) or {}
        state = {names.get(k, k): v for k, v in model.state_dict().items()}
        written = write_compressed(
            out["compressed"], state, {names.get(k, k) for k in masks}, compressed_format(self.spec.pattern)
        )
        return size_report(self.state.dense.get("safetensors_bytes"), out["pruned"], out["compressed"], written)

    def _speed(self, model: nn.Module, out: dict) -> dict | None:
        """The report's ``speed`` section (None when measuring is off): the pruned model now, the dense one from the
        start; the dense ONNX graph is the pruned graph with the pruned layers' dense weights put back."""
        if not self.latency.enabled:
            return None
        runtimes = self._runtimes()
        with self.timer("latency"):
            pruned = measure(model, self.xv, self.latency, runtimes, out.get("onnx"))
            dense = dict(self.state.dense.get("latency") or {})
            if ORT_CPU in runtimes:
                onnx = out.get("onnx")
                dense[ORT_CPU] = measure_dense_onnx(onnx, self._dense_weights, self.xv, self.latency, runtimes)
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        changed = self.state.dense.get("shapes") not in (None, shapes)
        return speed_report(self.latency, dense, pruned, self.spec.pattern, changed)

    def _plots(self, out: dict[str, Path]) -> None:
        """curve.png, quadratic.png (the loss change the quadratic model predicted per pruning step against the one
        measured on a training subset) and, for λ = 'auto', lambda_sweep.png; titled with model, method, target, λ."""
        scale = self.spec.fisher.lambda_scale
        title = plot_title(self.model_name, self.spec.method.value, self.spec.sparsity, self.state.lam, scale)
        atomic_write(out["curve_png"], curve_png(self.state.curve, self.spec.metric, title))
        if "quadratic_png" in out:
            atomic_write(out["quadratic_png"], quadratic_png(self.state.fidelity, title, split="train"))
        if "lambda_sweep_png" in out:
            png = lambda_sweep_png(self.state.lambda_sweep, self.state.lam, self.spec.metric, title)
            atomic_write(out["lambda_sweep_png"], png)

    def _report(self, model: nn.Module, masks: dict, example: Tensor, after: dict, onnx_error: str | None) -> dict:
        params = dict(model.named_parameters())
        layers = [
            {
                "name": n,
                "saved_as": (getattr(model, "source_names", None) or {}).get(n, n),
                "shape": list(params[n].shape),
                "numel": m.numel(),
                "sparsity": 1.0 - float(m.sum()) / m.numel(),
            }
            for n, m in masks.items()
        ]
        total = sum(p.numel() for p in params.values())
        zeros = sum(m.numel() - int(m.sum()) for m in masks.values())
        dense_macs, sparse_macs = count_macs(model, example, masks)
        fid = self.state.fidelity
        modelled = [f for f in fid if f["predicted_loss_change"] is not None]  # layer-wise methods predict none
        num = sum(f["predicted_loss_change"] * f["actual_loss_change"] for f in modelled)
        den = sum(f["predicted_loss_change"] ** 2 for f in modelled)
        return {
            "version": 1,
            "spec": self.spec.model_dump(mode="json", by_alias=True),
            "method": self.spec.method.value,
            "lambda": self.state.lam,
            "lambda_scale": self.spec.fisher.lambda_scale if self.curvature else None,
            "lambda_effective": self.state.lambda_effective,
            "block_size": self.plan.block_size if self.curvature else None,
            "memory_plan": self._plan_dict(),
            "lambda_sweep": self.state.lambda_sweep,
            "recompute": self._recompute() if self.curvature else None,
            "recompute_sweep": self.state.recompute_sweep,
            "sparsity": {"target": self.spec.sparsity, "pruned_layers": self._sparsity(), "global": zeros / total},
            "parameters": {
                "total": total,
                "nonzero": total - zeros,
                "pruned_layers": sum(m.numel() for m in masks.values()),
            },
            "macs": {"dense": dense_macs, "sparse": sparse_macs},
            "pattern": pattern_report(self.spec, masks),
            "layers": layers,
            "metrics": {"before": self.state.before, "after": after, "splits": self._splits()},
            "quadratic_model": {"steps": fid, "fitted_scale": num / den if den and math.isfinite(den) else None},
            "curve": self.state.curve,
            "seconds": self.state.seconds,
            "phases": self.timer.report(),
            "memory": self.peak.report(self.plan.total_bytes if self.curvature else None),
            "device": str(self.device),
            "onnx_error": onnx_error,
        }


def execute(
    spec: PruneSpec,
    model: nn.Module,
    data: Dataset,
    out_dir: Path,
    hooks: RunHooks | None = None,
    checkpointer: Checkpointer | None = None,
    *,
    memory_budget_mb: float | None = None,
    model_name: str | None = None,
    phases: PhaseTimer | None = None,
    latency: LatencyConfig | None = None,
) -> RunResult:
    """Run (or resume, when the checkpointer holds a state) ``spec`` on ``model`` and ``data``;
    ``memory_budget_mb`` is the server's budget, if any (the lower of it and the spec's applies); ``model_name``
    titles the plots; ``phases`` a timer holding the caller's phases so far (loading the inputs). A ``structure``
    other than 'unstructured' runs :func:`core.runs.structured.execute_structured`."""
    if spec.structure != "unstructured":
        device, hooks = resolve_device(spec.device), hooks or RunHooks()
        out, report = execute_structured(
            spec,
            model,
            data,
            out_dir,
            hooks,
            device,
            ARTIFACTS,
            model_name=model_name,
            phases=phases,
            latency=latency,
            checkpointer=checkpointer,
            memory_budget_mb=memory_budget_mb,
        )
        return RunResult(out, report)
    run = Run(
        spec,
        model,
        data,
        out_dir,
        hooks,
        checkpointer,
        memory_budget_mb=memory_budget_mb,
        model_name=model_name,
        phases=phases,
        latency=latency,
    )
    return run.execute()
