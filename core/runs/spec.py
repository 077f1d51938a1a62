"""The pruning spec (version 1): the API body, the task input and the argument of a run.

Every number is bounded: floats are finite (no NaN or ±Infinity, which JSON parsers read from ``Infinity`` or
``1e400``) and within the ranges below, integers within what a run (torch's seeded generators) and both databases
hold. A value outside is a field error at job creation, never a run that goes non-finite or a server error later.

* ``fisher.lambda`` (λ): [1e-12, 1e12], or ``"auto"`` (λ·m and 1/λ stay finite and meaningful in float32);
  ``fisher.recompute`` (R): 1 to 100, or ``"auto"`` (chosen by the same one-shot sweep, after λ);
  ``fisher.lambda_grid``: 1 to 32 such values (each one is a whole one-shot prune); with ``fisher.lambda_scale``
  'relative' both are factors α of the Fisher estimate's mean diagonal (the effective λ is α × that mean);
* ``finetune.lr``: (0, 10]; ``finetune.weight_decay``: [0, 1]; ``finetune.momentum``: [0, 1);
  ``schedule.exponent``: (0, 10]; ``memory_budget_mb``: (0, 2^30] (1 PiB);
* ``seed``: [0, 2^32 − 1] (the run seeds torch generators with seed · 7919 + epoch, which must fit 64 bits);
  epochs: at most 10,000; ``fisher.block_size``: at most 2^31 − 1 (a block larger than a layer is the layer).
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from core.engine.curvature.base import FisherConfig
from core.engine.grads import Loss
from core.engine.methods import METHODS, Method, MethodInfo, method_info
from core.engine.obs import Scope
from core.engine.patterns import Pattern
from core.runs.text_spec import TextSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


LAMBDA_MIN, LAMBDA_MAX = 1e-12, 1e12
LAMBDA_GRID_MAX = 32
SEED_MAX = 2**32 - 1
EPOCHS_MAX = 10_000
BLOCK_SIZE_MAX = 2**31 - 1
#: the measured defaults (bench/defaults.py): m up to 512 Fisher samples; λ, R and the update by method (the joint
#: update where the method has it; λ and R from ``MethodInfo``: woodfisher a fixed relative α = 0.1, kfac and
#: diag_fisher λ 'auto', the one-shot sweep on the calibration split, as no fixed λ of theirs serves every sparsity;
#: R fixed, 16 or 64 for kfac, as R 'auto' did not pay on the means: README, Defaults); whole-layer blocks where the
#: memory budget allows (:mod:`core.runs.budget`)
DEFAULT_SAMPLES = 512
#: the grids λ = 'auto' sweeps when the spec gives none: relative factors α (scale-free), or absolute values
RELATIVE_GRID = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
ABSOLUTE_GRID = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
#: the R values 'auto' sweeps (one-shot, at the chosen λ), up to the method's ``recompute_sweep_max``
RECOMPUTE_GRID = [4, 16, 64]
#: α of a relative λ the spec asks for where the method has no relative default (kfac: the best α measured)
DEFAULT_RELATIVE_LAMBDA = 0.1
#: the engine's reading of a relative λ (``FisherConfig.lam_scale``): the mean diagonal over all pruned layers
RELATIVE_ENGINE_SCALE = "relative"
MEMORY_BUDGET_MB_MAX = float(2**30)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _lambda_value(value: Any, what: str) -> Any:
    """Refuses a number that is not a usable λ with one message that says the range (before the type's own
    bounds, which would also refuse it, but in two errors, one per member of the union)."""
    if not _is_number(value):
        return value
    try:
        x = float(value)
    except OverflowError:  # an integer literal beyond any float
        x = math.inf if value > 0 else -math.inf
    if math.isfinite(x) and LAMBDA_MIN <= x <= LAMBDA_MAX:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        reason = "finite"
    else:
        reason = "> 0" if x <= 0 else "at least 1e-12" if x < LAMBDA_MIN else "at most 1e12"
    raise ValueError(f"{what} must be {reason} (a finite number in [1e-12, 1e12])")


def _grid_value(value: Any) -> Any:
    try:
        return _lambda_value(value, "each value")
    except ValueError as e:
        raise ValueError(f"lambda_grid must hold positive values: {e}") from None


#: a dampening λ: finite, within [LAMBDA_MIN, LAMBDA_MAX]
Lambda = Annotated[float, Field(ge=LAMBDA_MIN, le=LAMBDA_MAX, allow_inf_nan=False)]
GridLambda = Annotated[Lambda, BeforeValidator(_grid_value)]


def finite_float(*, default: Any = ..., **bounds: Any) -> Any:
    """A float field that refuses NaN and ±Infinity, with its bounds."""
    return Field(default, allow_inf_nan=False, **bounds)


class FisherKind(str, Enum):
    EMPIRICAL = "empirical"
    TRUE = "true"


class Update(str, Enum):
    SUMMED = "summed"
    JOINT = "joint"


class FisherSpec(_Strict):
    samples: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="m: number of Fisher samples (gradients; for sparsegpt, obc and wanda: calibration inputs); "
        f"default: as many as the training split allows, up to {DEFAULT_SAMPLES} (training examples // batch_size)",
    )
    batch_size: int = Field(1, ge=1, le=4096, description="Fisher mini-batch size: examples averaged per sample")
    block_size: Annotated[int, Field(ge=1, le=BLOCK_SIZE_MAX)] | Literal["layer", "auto"] = Field(
        "auto",
        description="c: weights per diagonal block (larger than a layer: the layer), 'layer', or 'auto': whole "
        "layers where the memory plan fits the budget, else the largest block size that does",
    )
    damping: Lambda | Literal["auto"] | None = Field(
        None,
        alias="lambda",
        description="λ (dampening), in [1e-12, 1e12], absolute or relative (lambda_scale); 'auto' sweeps "
        "lambda_grid (widened past an edge that wins) on a calibration split carved out of the training data, the "
        "lowest calibration loss winning; "
        "default: the method's (core.engine.methods: 'auto' where default_lambda_sweep is set, kfac and diag_fisher; "
        "else default_lambda_relative, else default_lambda)",
    )
    lambda_scale: Literal["absolute", "relative"] | None = Field(
        None,
        description="how lambda and lambda_grid are read: 'absolute' (λ itself) or 'relative' (a factor α: λ = α × "
        "the mean diagonal of the Fisher estimate over the live pruned weights, recomputed with every estimate); "
        "default: 'absolute' when lambda is a number or lambda_grid is given; else 'relative' for 'auto' (methods that "
        "take it) and for a default λ where the method has a relative default (woodfisher)",
    )
    lambda_grid: list[GridLambda] | None = Field(
        None,
        min_length=1,
        max_length=LAMBDA_GRID_MAX,
        description="the λ values 'auto' tries (1 to 32), each in [1e-12, 1e12]; when the best is the smallest or "
        "largest, two more decades past it are tried, at most twice; default: relative "
        f"{RELATIVE_GRID}, absolute {ABSOLUTE_GRID}",
    )
    recompute: Annotated[int, Field(ge=1, le=100)] | Literal["auto"] | None = Field(
        None,
        description="R: sub-steps per pruning step (1 to 100), inverse recomputed in each; 'auto' chooses R from "
        f"{RECOMPUTE_GRID} (up to the method's recompute_sweep_max: 16, 64 for kfac and diag_fisher) by one-shot "
        "prunes at the chosen λ scored on the calibration split, as lambda 'auto'; default: the method's (16; 64 for "
        "kfac)",
    )
    kind: FisherKind = FisherKind.EMPIRICAL
    update: Update | None = Field(
        None, description="the OBS update; default: 'joint' where the method supports it, else 'summed'"
    )
    chunk: int = Field(64, ge=1, le=65536, description="Fisher samples per vmap chunk (memory bound)")
    path: Literal["auto", "streamed", "buffered"] = Field(
        "auto",
        description="woodfisher/woodtaylor: 'streamed' accumulates the dense blocks' (c ≤ m) Gram matrices chunk by "
        "chunk (memory D·c + k·D), 'buffered' holds the m × D gradients; 'auto': the memory plan chooses (streamed "
        "when some block is dense)",
    )
    buffer_dtype: Literal["bfloat16", "float16"] | None = Field(
        None, description="held gradients (buffered path, Woodbury layers) in half precision; sums stay in the run's"
    )

    @field_validator("block_size", mode="before")
    @classmethod
    def _block_size(cls, value: Any) -> Any:
        if _is_number(value) and not 1 <= value <= BLOCK_SIZE_MAX:
            raise ValueError(f"block_size must be ≥ 1 (at most {BLOCK_SIZE_MAX}), 'layer' or 'auto'")
        return value

    @field_validator("damping", mode="before")
    @classmethod
    def _damping(cls, value: Any) -> Any:
        return _lambda_value(value, "lambda")

    @field_validator("recompute", mode="before")
    @classmethod
    def _recompute(cls, value: Any) -> Any:
        if value == "auto" or value is None or (_is_number(value) and 1 <= value <= 100 and value == int(value)):
            return value
        raise ValueError("recompute must be an integer from 1 to 100, or 'auto'")


class ScheduleSpec(_Strict):
    """Gradual pruning, in fine-tuning epochs: s_t = s_f − (s_f − s_i)(1 − (t − start)/(end − start))^exponent."""

    initial_sparsity: float = finite_float(default=0.0, ge=0.0, lt=1.0)
    start_epoch: int = Field(0, ge=0, le=EPOCHS_MAX)
    end_epoch: int = Field(4, ge=0, le=EPOCHS_MAX)
    frequency: int = Field(1, ge=1, le=EPOCHS_MAX, description="epochs between pruning steps")
    exponent: float = finite_float(default=3.0, gt=0, le=10, description="in (0, 10]; 3 = cubic polynomial schedule")

    @model_validator(mode="after")
    def _check(self) -> ScheduleSpec:
        if self.end_epoch < self.start_epoch:
            raise ValueError("end_epoch must be ≥ start_epoch")
        return self


#: gradual mode without finetune.epochs: this many fine-tuning epochs after the schedule's last pruning step
GRADUAL_EXTRA_EPOCHS = 2
#: gradual mode whose finetune sets no optimizer, lr, lr_schedule or momentum: SGD (momentum 0.9), lr 0.05, cosine
#: (bench/gradual.py, MLP to 95 %: 0.969 against 0.944 with lr 0.01 constant and 0.958 with Adam 1e-3; LeNet-5 to
#: 95 %, 3 seeds: 0.961 against 0.928 for the one-shot default)
GRADUAL_FINETUNE = {"lr": 0.05, "lr_schedule": "cosine"}
_OPTIMIZER_FIELDS = {"optimizer", "lr", "lr_schedule", "momentum"}


class FinetuneSpec(_Strict):
    epochs: int | None = Field(
        None,
        ge=0,
        le=EPOCHS_MAX,
        description="default: 0 one-shot; gradual, schedule.end_epoch + 2 (two epochs after the last pruning step)",
    )
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = finite_float(default=0.01, gt=0, le=10, description="learning rate, in (0, 10]")
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"
    momentum: float = finite_float(default=0.9, ge=0, lt=1)
    weight_decay: float = finite_float(default=0.0, ge=0, le=1, description="in [0, 1]")
    batch_size: int = Field(64, ge=1, le=65536)


class LayerSpec(_Strict):
    include: list[str] | None = Field(
        None, description="glob patterns over parameter names; default: Linear/Conv weights"
    )
    exclude: list[str] = Field(default_factory=list, description="patterns kept dense")
    keep_first_dense: bool = False
    keep_last_dense: bool = False


class LayerwiseSpec(_Strict):
    """The layer-wise methods (sparsegpt, obc, wanda): calibration inputs only (``fisher.samples`` examples)."""

    damp: float = finite_float(
        default=0.01, ge=1e-8, le=100, description="dampening of H, relative to its mean diagonal; in [1e-8, 100]"
    )
    block_size: int = Field(128, ge=1, le=65536, description="SparseGPT's lazy column block")
    batch_size: int = Field(16, ge=1, le=65536, description="calibration examples per forward pass (memory bound)")


class ExportSpec(_Strict):
    """What a job writes besides the pruned weights, masks, compressed weights and report (always written)."""

    onnx: bool = Field(
        True,
        description="write model.onnx (the pruned model's ONNX graph) and measure ONNX Runtime's latency on it; false "
        "skips both (the export of a large transformer takes minutes of CPU)",
    )


#: what a prune removes: single weights, or whole units (core.engine.structured)
Structure = Literal["unstructured", "neurons", "channels", "heads"]


class PruneSpec(_Strict):
    version: Literal[1] = 1
    method: Method = Method.WOODFISHER
    sparsity: float = finite_float(
        gt=0.0,
        lt=1.0,
        description="target fraction of pruned weights; with a structure other than 'unstructured', the fraction of "
        "each layer's units (neurons, channels, heads) removed",
    )
    structure: Structure = Field(
        "unstructured",
        description="'unstructured' (single weights, masked) or whole units removed and the model physically "
        "shrunk: 'neurons' (MLP hidden units, transformer FFN units), 'channels' (conv channels, ResNet blocks' inner "
        "channels and stage widths), 'heads' (attention heads); methods obc and sparsegpt score units by OBS group "
        "saliency on the layer-wise Hessian with the joint update, woodfisher by OBS group saliency on the empirical "
        "Fisher blocks of the consumer's weights (fisher.block_size 'auto': one block per row; default relative λ "
        "1e-3) with the update, magnitude by their L2 norm",
    )
    structure_allocation: Literal["uniform", "global"] = Field(
        "uniform",
        description="with a structure: 'uniform' (every family, e.g. each layer's neurons, loses the fraction "
        "'sparsity' of its units) or 'global' (that fraction of all units, the cheapest over all families by a "
        "comparable score, at least one unit kept per family; zoo models only: a Hugging Face config holds one width)",
    )
    mode: Literal["one_shot", "gradual"] = "one_shot"
    scope: Scope | None = Field(None, description="global or per-layer threshold; default by method")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    fisher: FisherSpec = Field(default_factory=FisherSpec)
    layers: LayerSpec = Field(default_factory=LayerSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    loss: Loss = Loss.CROSS_ENTROPY
    metric: Literal["accuracy", "loss"] = "accuracy"
    val_fraction: float = finite_float(default=0.2, gt=0.0, lt=1.0, description="held-out split when the data has none")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seeds every random draw of the run; in [0, 2^32 − 1]")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    memory_budget_mb: float | None = finite_float(
        default=None,
        gt=0,
        le=MEMORY_BUDGET_MB_MAX,
        description="refuse (or shrink blocks) when the run's memory plan is above this; the server's "
        "ARBORIST_MEMORY_BUDGET_MB, if set, applies too (the lower of the two)",
    )
    allow_block_shrink: bool = False
    pattern: str = Field(
        "unstructured",
        max_length=32,
        description="'unstructured', 'N:M' (at most N kept of every M consecutive inputs of a row, e.g. '2:4'; fixes "
        "sparsity at 1 − N/M, so sparsity may be left out) or 'block:RxC' (whole R × C tiles, e.g. 'block:4x4')",
    )
    layerwise: LayerwiseSpec = Field(default_factory=LayerwiseSpec)
    text: TextSpec = Field(default_factory=TextSpec, description="Hugging Face models: tokenization and objective")
    export: ExportSpec = Field(default_factory=ExportSpec, description="optional artifacts (ONNX)")

    @model_validator(mode="before")
    @classmethod
    def _pattern_sparsity(cls, data: Any) -> Any:
        """An N:M pattern fixes the sparsity: filled in when absent, refused when it disagrees."""
        if not isinstance(data, dict) or not isinstance(data.get("pattern"), str):
            return data
        try:
            fixed = Pattern.parse(data["pattern"]).fixed_sparsity
        except ValueError:
            return data  # the field's own validator says why
        if fixed is None:
            return data
        if "sparsity" not in data:
            return {**data, "sparsity": fixed}
        given = data["sparsity"]
        try:
            differs = _is_number(given) and not math.isclose(float(given), fixed, abs_tol=1e-9)
        except OverflowError:  # an integer beyond any float: the field's own bounds refuse it
            differs = False
        if differs:
            raise ValueError(
                f"pattern {data['pattern']} fixes sparsity at {fixed:g}; leave sparsity out or set it to {fixed:g}"
            )
        return data

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        return str(Pattern.parse(value))

    @model_validator(mode="after")
    def _check(self) -> PruneSpec:
        if self.finetune.epochs is None:  # a copy: the caller's FinetuneSpec instance is never changed
            epochs = self.schedule.end_epoch + GRADUAL_EXTRA_EPOCHS if self.mode == "gradual" else 0
            self.finetune = self.finetune.model_copy(update={"epochs": epochs})
        if self.mode == "gradual" and not self.finetune.model_fields_set & _OPTIMIZER_FIELDS:
            self.finetune = self.finetune.model_copy(update=GRADUAL_FINETUNE)
        if self.mode == "gradual":
            if self.finetune.epochs < 1:
                raise ValueError("gradual mode needs finetune.epochs ≥ 1")
            if self.schedule.end_epoch >= self.finetune.epochs:
                raise ValueError("schedule.end_epoch must be < finetune.epochs")
            if self.schedule.initial_sparsity > self.sparsity:
                raise ValueError("schedule.initial_sparsity must be ≤ sparsity")
        info = method_info(self.method)
        f = self.fisher
        if f.lambda_scale == "relative" and info.needs_gradients and not info.relative_lambda:
            raise ValueError(f"{self.method.value} takes an absolute lambda only (lambda_scale 'absolute')")
        if f.lambda_scale is not None:
            scale = f.lambda_scale
        elif isinstance(f.damping, float) or f.lambda_grid is not None:
            scale = "absolute"  # as before lambda_scale existed
        elif f.damping == "auto" or (f.damping is None and info.default_lambda_sweep is not None):
            # the sweep, asked for or the method's default (kfac, diag_fisher): on the grid it measured best with
            scale = info.default_lambda_sweep or ("relative" if info.relative_lambda else "absolute")
        else:
            scale = "relative" if info.default_lambda_relative is not None else "absolute"
        relative = scale == "relative"
        structured = self.structure != "unstructured" and info.structured_lambda_relative is not None
        alpha = (info.structured_lambda_relative if structured else info.default_lambda_relative) or (
            DEFAULT_RELATIVE_LAMBDA
        )
        # the default λ is the calibration sweep where the method has it, unless the spec asks for a fixed λ's scale
        sweep = info.default_lambda_sweep is not None and f.lambda_scale is None and self.structure == "unstructured"
        defaults = {  # the method's own defaults where the spec sets none; a copy: the caller's FisherSpec stays
            "update": Update.JOINT if info.supports_joint else Update.SUMMED,
            "damping": "auto" if sweep else alpha if relative else info.default_lambda,
            "recompute": "auto" if info.default_recompute_sweep else info.default_recompute,
            "lambda_scale": scale,
            "lambda_grid": list(RELATIVE_GRID if relative else ABSOLUTE_GRID),
        }
        if missing := {k: v for k, v in defaults.items() if getattr(self.fisher, k) is None}:
            self.fisher = self.fisher.model_copy(update=missing)
        info.check(self.scope, self.fisher.update is Update.JOINT)
        if self.structure != "unstructured":
            self._check_structured(info)
        elif self.structure_allocation != "uniform":
            raise ValueError("structure_allocation is for a structure (neurons, channels, heads), not 'unstructured'")
        if self.loss is Loss.MSE and self.metric == "accuracy":
            raise ValueError("metric 'accuracy' needs loss 'cross_entropy'")
        return self

    def _check_structured(self, info: MethodInfo) -> None:
        if info.group_saliency is None:
            able = ", ".join(i.name.value for i in METHODS.values() if i.group_saliency)
            raise ValueError(f"structure {self.structure!r} is pruned by method {able}, not {self.method.value}")
        if self.mode != "one_shot":
            raise ValueError("a structured prune is one-shot (mode 'one_shot'; finetune.epochs fine-tune the result)")
        if self.pattern != "unstructured":
            raise ValueError(f"pattern {self.pattern} is for unstructured pruning; a structure removes whole units")
        if info.group_saliency == "fisher" and self.fisher.damping == "auto":
            raise ValueError("lambda 'auto' is not supported with a structure: give a lambda (default: the method's)")

    @property
    def calibrates(self) -> bool:
        """Whether a run holds a calibration split out of its training data: λ or R 'auto' on a method that uses
        them (one with gradients; magnitude sweeps nothing)."""
        auto = self.fisher.damping == "auto" or self.fisher.recompute == "auto"
        return auto and method_info(self.method).needs_gradients

    def recompute_grid(self) -> list[int]:
        """The R values 'auto' tries: :data:`RECOMPUTE_GRID` up to the method's ``recompute_sweep_max``."""
        cap = method_info(self.method).recompute_sweep_max
        return [r for r in RECOMPUTE_GRID if r <= cap] or [cap]

    @property
    def block_size(self) -> int | None:
        """c, None for whole layers ('layer', and where 'auto' starts: :func:`core.runs.budget.memory_plan`)."""
        return None if self.fisher.block_size in ("layer", "auto") else self.fisher.block_size

    def fisher_samples(self, train_examples: int | None) -> int:
        """m: the spec's ``fisher.samples``, or by default as many as ``train_examples`` allow (at ``fisher.batch_size``
        examples each), up to :data:`DEFAULT_SAMPLES`; without a count (unknown), :data:`DEFAULT_SAMPLES`."""
        if self.fisher.samples is not None:
            return self.fisher.samples
        if train_examples is None:
            return DEFAULT_SAMPLES
        return max(1, min(DEFAULT_SAMPLES, train_examples // self.fisher.batch_size))

    def resolved(self, train_examples: int | None) -> PruneSpec:
        """This spec with the defaults that depend on the data filled in (``fisher.samples``); what a run executes
        and its report shows."""
        if self.fisher.samples is not None:
            return self
        fisher = self.fisher.model_copy(update={"samples": self.fisher_samples(train_examples)})
        return self.model_copy(update={"fisher": fisher})

    @property
    def fisher_examples(self) -> int:
        """Training examples the curvature estimate draws (samples × batch size); 0 for methods that draw none."""
        if not method_info(self.method).needs_data:
            return 0
        return self.fisher_samples(None) * self.fisher.batch_size

    def fisher_config(self, lam: float, seed: int) -> FisherConfig:
        """The engine's Fisher settings for one estimate: λ (the one chosen when 'auto') and its seed."""
        f = self.fisher
        return FisherConfig(
            m=self.fisher_samples(None),
            fisher_batch=f.batch_size,
            lam=lam,
            true_fisher=f.kind is FisherKind.TRUE,
            loss=self.loss,
            chunk=f.chunk,
            seed=seed,
            path=f.path,
            buffer_dtype=getattr(torch, f.buffer_dtype) if f.buffer_dtype else None,
            lam_scale=RELATIVE_ENGINE_SCALE if f.lambda_scale == "relative" else "absolute",
        )
