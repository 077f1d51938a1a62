"""Pruners: a curvature estimator + the OBS step, reaching a target sparsity in R sub-steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from core.engine.buffers import map_large_allocations
from core.engine.curvature.base import CurvatureEstimator, FisherConfig
from core.engine.layerwise.sequential import LayerwiseConfig, LayerwisePruner
from core.engine.layout import BlockLayout
from core.engine.methods import Method, method_info
from core.engine.obs import Scope, obs_step
from core.engine.patterns import Pattern
from core.engine.phases import phase


@dataclass
class StepLog:
    sparsity: float
    predicted_loss_change: float
    lambdas: dict[str, float] = field(default_factory=dict)  # the effective λ per layer (absolute)


def substep_targets(start: float, sparsity: float, steps: int) -> list[float]:
    """The sparsity after each of ``steps`` sub-steps from ``start`` to ``sparsity``: geometric in the density, so
    every sub-step removes the same fraction of the weights still alive (linear spacing made the last sub-steps to
    a high target remove over half of what was left, and collapse: bench/defaults.py measured MLP 0.649 → 0.870 at
    95 % with R = 16). The last target is ``sparsity`` exactly."""
    if steps < 1:
        raise ValueError("steps must be ≥ 1")
    if sparsity <= start:
        return [sparsity] * steps
    ratio = (1.0 - sparsity) / (1.0 - start)
    return [1.0 - (1.0 - start) * ratio ** (r / steps) for r in range(1, steps)] + [sparsity]


@dataclass
class Pruner:
    """Prunes the named parameters of a model in place; masks are {name: 0/1 tensor}."""

    estimator: CurvatureEstimator
    scope: Scope = Scope.GLOBAL
    joint: bool = False
    taylor: bool = False
    recompute: int = 1
    dtype: torch.dtype = torch.float32
    pattern: Pattern = field(default_factory=Pattern)
    log: list[StepLog] = field(default_factory=list)

    def prune(
        self,
        model: nn.Module,
        names: list[str],
        sparsity: float,
        data: tuple[Tensor, Tensor],
        masks: dict[str, Tensor] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> dict[str, Tensor]:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError("sparsity must be in [0, 1)")
        map_large_allocations()  # freed tensors leave the process: its peak follows the live ones, as the plan counts
        params = dict(model.named_parameters())
        layout = BlockLayout.for_model(model, names, self.estimator.block_size)
        device = params[names[0]].device
        keep = {n: (masks[n] if masks and n in masks else torch.ones_like(params[n])) for n in names}
        mask = layout.flatten(keep, self.dtype).to(device)
        start = 1.0 - float(mask.sum()) / layout.numel  # padding is 0 in the mask and not counted
        for r, target in enumerate(substep_targets(start, sparsity, self.recompute), start=1):

            def sub(done: int, total: int, r=r) -> None:
                if progress:
                    progress((r - 1 + done / max(total, 1)) / self.recompute)

            with phase("curvature"):  # the estimators' own sub-phases (gradients, inverse) take their share
                curvature = self.estimator.estimate(model, layout, mask, data, sub)
            w = layout.flatten({n: params[n].detach() for n in names}, self.dtype)
            with phase("obs"):
                result = obs_step(
                    w,
                    mask,
                    curvature.segments,
                    layout,
                    target,
                    scope=self.scope,
                    joint=self.joint,
                    grad=curvature.grad if self.taylor else None,
                    pattern=self.pattern,
                )
            lambdas = curvature.lambdas
            del curvature
            with torch.no_grad():
                for n, t in layout.unflatten(result.weights).items():
                    params[n].copy_(t)
            mask = result.mask
            self.log.append(StepLog(target, result.predicted_loss_change, lambdas))
        return {n: t.to(params[n].dtype) for n, t in layout.unflatten(mask).items()}


def make_pruner(
    method: Method | str,
    fisher: FisherConfig | None = None,
    *,
    block_size: int | None = 128,
    scope: Scope | str | None = None,
    joint: bool = False,
    recompute: int = 1,
    dtype: torch.dtype = torch.float32,
    pattern: Pattern | str | None = None,
    layerwise: LayerwiseConfig | None = None,
) -> Pruner | LayerwisePruner:
    """The pruner for a method name, with the method's natural defaults (see ``core.engine.methods``); a layer-wise
    method (SparseGPT, OBC, Wanda) gets a :class:`LayerwisePruner` with ``layerwise`` (its calibration settings)."""
    info = method_info(method)
    scope = info.default_scope if scope is None else Scope(scope)
    info.check(scope, joint)
    pattern = pattern if isinstance(pattern, Pattern) else Pattern.parse(pattern)
    if info.layerwise is not None:
        cfg = layerwise or LayerwiseConfig()
        options = {"damp": cfg.damp}
        if info.name is Method.SPARSEGPT:
            options["blocksize"] = cfg.blocksize
        if info.name is Method.WANDA:
            options = {}
        return LayerwisePruner(info.layerwise, pattern, cfg, options)
    return Pruner(
        info.estimator(fisher or FisherConfig(), block_size),
        scope,
        joint,
        taylor=info.taylor,
        recompute=recompute,
        dtype=dtype,
        pattern=pattern,
    )
