"""The pruning spec (version 1): the API body, the task input and the argument of a run."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.engine.curvature.base import FisherConfig
from core.engine.grads import Loss
from core.engine.methods import Method, method_info
from core.engine.obs import Scope


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FisherKind(str, Enum):
    EMPIRICAL = "empirical"
    TRUE = "true"


class Update(str, Enum):
    SUMMED = "summed"
    JOINT = "joint"


class FisherSpec(_Strict):
    samples: int = Field(256, ge=1, le=1_000_000, description="m: number of Fisher samples (gradients)")
    batch_size: int = Field(1, ge=1, le=4096, description="Fisher mini-batch size: examples averaged per sample")
    block_size: int | Literal["layer"] = Field(128, description="c: weights per diagonal block, or 'layer'")
    damping: float | Literal["auto"] = Field(
        1e-5, alias="lambda", description="λ (dampening); 'auto' sweeps lambda_grid on the validation split"
    )
    lambda_grid: list[float] = Field(default_factory=lambda: [1e-7, 1e-5, 1e-3, 1e-1, 1e1])
    recompute: int = Field(1, ge=1, le=100, description="R: sub-steps per pruning step, inverse recomputed in each")
    kind: FisherKind = FisherKind.EMPIRICAL
    update: Update = Update.SUMMED
    chunk: int = Field(64, ge=1, le=65536, description="Fisher samples per vmap chunk (memory bound)")

    @model_validator(mode="after")
    def _check(self) -> FisherSpec:
        if isinstance(self.block_size, int) and self.block_size < 1:
            raise ValueError("block_size must be ≥ 1 or 'layer'")
        if isinstance(self.damping, float) and not self.damping > 0:
            raise ValueError("lambda must be > 0")
        if not self.lambda_grid or any(v <= 0 for v in self.lambda_grid):
            raise ValueError("lambda_grid must hold positive values")
        return self


class ScheduleSpec(_Strict):
    """Gradual pruning, in fine-tuning epochs: s_t = s_f − (s_f − s_i)(1 − (t − start)/(end − start))^exponent."""

    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    start_epoch: int = Field(0, ge=0)
    end_epoch: int = Field(4, ge=0)
    frequency: int = Field(1, ge=1, description="epochs between pruning steps")
    exponent: float = Field(3.0, gt=0, description="3 = cubic polynomial schedule")

    @model_validator(mode="after")
    def _check(self) -> ScheduleSpec:
        if self.end_epoch < self.start_epoch:
            raise ValueError("end_epoch must be ≥ start_epoch")
        return self


class FinetuneSpec(_Strict):
    epochs: int = Field(0, ge=0, le=10_000)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0)
    lr_schedule: Literal["constant", "cosine", "step"] = "constant"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
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
    sparsity: float = Field(..., gt=0.0, lt=1.0, description="target fraction of pruned weights")
    mode: Literal["one_shot", "gradual"] = "one_shot"
    scope: Scope | None = Field(None, description="global or per-layer threshold; default by method")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    fisher: FisherSpec = Field(default_factory=FisherSpec)
    layers: LayerSpec = Field(default_factory=LayerSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    loss: Loss = Loss.CROSS_ENTROPY
    metric: Literal["accuracy", "loss"] = "accuracy"
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out split when the data has none")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    memory_budget_mb: float | None = Field(None, gt=0, description="refuse (or shrink blocks) above this")
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
        method_info(self.method).check(self.scope, self.fisher.update is Update.JOINT)
        if self.loss is Loss.MSE and self.metric == "accuracy":
            raise ValueError("metric 'accuracy' needs loss 'cross_entropy'")
        return self

    @property
    def block_size(self) -> int | None:
        return None if self.fisher.block_size == "layer" else self.fisher.block_size

    @property
    def fisher_examples(self) -> int:
        """Training examples the curvature estimate draws (samples × batch size); 0 for methods that draw none."""
        if not method_info(self.method).needs_data:
            return 0
        return self.fisher.samples * self.fisher.batch_size

    def fisher_config(self, lam: float, seed: int) -> FisherConfig:
        """The engine's Fisher settings for one estimate: λ (the one chosen when 'auto') and its seed."""
        f = self.fisher
        return FisherConfig(
            m=f.samples,
            fisher_batch=f.batch_size,
            lam=lam,
            true_fisher=f.kind is FisherKind.TRUE,
            loss=self.loss,
            chunk=f.chunk,
            seed=seed,
        )
