"""The pruning spec (version 1): the API body, the task input and the argument of a run.

Every number is bounded: floats are finite (no NaN or ±Infinity, which JSON parsers read from ``Infinity`` or
``1e400``) and within the ranges below, integers within what a run (torch's seeded generators) and both databases
hold. A value outside is a field error at job creation, never a run that goes non-finite or a server error later.

* ``fisher.lambda`` (λ): [1e-12, 1e12], or ``"auto"`` (λ·m and 1/λ stay finite and meaningful in float32);
  ``fisher.lambda_grid``: 1 to 32 such values (each one is a whole one-shot prune);
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
from core.engine.methods import Method, method_info
from core.engine.obs import Scope


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


LAMBDA_MIN, LAMBDA_MAX = 1e-12, 1e12
LAMBDA_GRID_MAX = 32
SEED_MAX = 2**32 - 1
EPOCHS_MAX = 10_000
BLOCK_SIZE_MAX = 2**31 - 1
#: the measured defaults (bench/defaults.py): m up to 512 Fisher samples, R = 16 sub-steps, the joint update
DEFAULT_SAMPLES = 512
DEFAULT_RECOMPUTE = 16
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
        description="m: number of Fisher samples (gradients); default: as many as the training split allows, "
        f"up to {DEFAULT_SAMPLES} (training examples // batch_size)",
    )
    batch_size: int = Field(1, ge=1, le=4096, description="Fisher mini-batch size: examples averaged per sample")
    block_size: Annotated[int, Field(ge=1, le=BLOCK_SIZE_MAX)] | Literal["layer"] = Field(
        128, description="c: weights per diagonal block (larger than a layer: the layer), or 'layer'"
    )
    damping: Lambda | Literal["auto"] = Field(
        1e-5,
        alias="lambda",
        description="λ (dampening), in [1e-12, 1e12]; 'auto' sweeps lambda_grid (widened past an edge that wins) "
        "on a calibration split carved out of the training data",
    )
    lambda_grid: list[GridLambda] = Field(
        default_factory=lambda: [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
        min_length=1,
        max_length=LAMBDA_GRID_MAX,
        description="the λ values 'auto' tries (1 to 32), each in [1e-12, 1e12]; when the best is the smallest or "
        "largest, two more decades past it are tried, at most twice",
    )
    recompute: int = Field(
        DEFAULT_RECOMPUTE, ge=1, le=100, description="R: sub-steps per pruning step, inverse recomputed in each"
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
            raise ValueError(f"block_size must be ≥ 1 (at most {BLOCK_SIZE_MAX}) or 'layer'")
        return value

    @field_validator("damping", mode="before")
    @classmethod
    def _damping(cls, value: Any) -> Any:
        return _lambda_value(value, "lambda")


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


class FinetuneSpec(_Strict):
    epochs: int = Field(0, ge=0, le=EPOCHS_MAX)
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


class PruneSpec(_Strict):
    version: Literal[1] = 1
    method: Method = Method.WOODFISHER
    sparsity: float = finite_float(gt=0.0, lt=1.0, description="target fraction of pruned weights")
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

    @model_validator(mode="after")
    def _check(self) -> PruneSpec:
        if self.mode == "gradual":
            if self.finetune.epochs < 1:
                raise ValueError("gradual mode needs finetune.epochs ≥ 1")
            if self.schedule.end_epoch >= self.finetune.epochs:
                raise ValueError("schedule.end_epoch must be < finetune.epochs")
            if self.schedule.initial_sparsity > self.sparsity:
                raise ValueError("schedule.initial_sparsity must be ≤ sparsity")
        info = method_info(self.method)
        if self.fisher.update is None:  # a copy: the caller's FisherSpec instance is never changed
            update = Update.JOINT if info.supports_joint else Update.SUMMED
            self.fisher = self.fisher.model_copy(update={"update": update})
        info.check(self.scope, self.fisher.update is Update.JOINT)
        if self.loss is Loss.MSE and self.metric == "accuracy":
            raise ValueError("metric 'accuracy' needs loss 'cross_entropy'")
        return self

    @property
    def block_size(self) -> int | None:
        return None if self.fisher.block_size == "layer" else self.fisher.block_size

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
        )
