"""The pruning methods: the one table that says what each method is and what a run of it needs.

A method is a curvature estimator plus its rules: the scopes it thresholds over, whether it takes the joint
OBS update, whether it uses the first-order term, what it draws from the data and how much memory its estimate
takes. The pruner, the memory plan and the spec's validation read this table; a new method is one entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from core.engine.curvature.base import CurvatureEstimator, FisherConfig
from core.engine.curvature.fisher import DiagonalFisher, Identity, WoodFisher
from core.engine.curvature.hessian import ExactHessian
from core.engine.curvature.kfac import KFAC
from core.engine.layout import BlockLayout
from core.engine.obs import Scope


class Method(str, Enum):
    WOODFISHER = "woodfisher"
    WOODTAYLOR = "woodtaylor"
    MAGNITUDE = "magnitude"
    GLOBAL_MAGNITUDE = "global_magnitude"
    DIAG_FISHER = "diag_fisher"
    KFAC = "kfac"
    EXACT_OBS = "exact_obs"


#: a method's estimator from the Fisher sampling settings and the block size (None: one block per layer)
EstimatorFactory = Callable[[FisherConfig, int | None], CurvatureEstimator]
#: (gradient bytes, inverse bytes) a method's estimate holds at its peak, from the layout, m and the item size
MemoryFormula = Callable[[BlockLayout, int, int], tuple[int, int]]


@dataclass(frozen=True)
class MethodInfo:
    """One pruning method: how its curvature is estimated and the rules a run of it follows."""

    name: Method
    estimator: EstimatorFactory
    memory: MemoryFormula
    needs_data: bool = True  # draws training examples (fisher.samples × fisher.batch_size) for its estimate
    needs_gradients: bool = True  # differentiates the loss at those examples
    needs_labels: bool = True  # reads their labels
    default_scope: Scope = Scope.GLOBAL
    scopes: frozenset[Scope] = frozenset(Scope)  # the scopes it may threshold over
    supports_joint: bool = True  # takes the joint OBS update; else the summed one only
    taylor: bool = False  # uses the first-order term (the mean gradient) in the OBS step
    uses_blocks: bool = False  # block-diagonal in fisher.block_size blocks, which a memory budget may shrink

    def check(self, scope: Scope | str | None, joint: bool) -> None:
        """Raise ValueError for a scope (None: the default) or an update this method does not support."""
        if scope is not None and (scope := Scope(scope)) not in self.scopes:
            allowed = " or ".join(s.value for s in Scope if s in self.scopes)
            same = [i.name.value for i in METHODS.values() if i.estimator is self.estimator and scope in i.scopes]
            raise ValueError(f"{self.name.value} is per {allowed}" + (f"; use method {same[0]}" if same else ""))
        if joint and not self.supports_joint:
            raise ValueError(f"{self.name.value} supports fisher.update = 'summed' only")


def _identity(fisher: FisherConfig, block_size: int | None) -> CurvatureEstimator:
    return Identity()


def _no_memory(layout: BlockLayout, m: int, itemsize: int) -> tuple[int, int]:
    return 0, 0


def _block_memory(layout: BlockLayout, m: int, itemsize: int) -> tuple[int, int]:
    """m gradients of the padded width; per block a dense c×c inverse (c ≤ m), or the Woodbury m×c factor and its
    m×m Gram matrix (c > m)."""

    def per_block(c: int) -> int:
        return c * c if c <= m else m * c + m * m

    inverse = sum(layer.nb * per_block(layer.block) for layer in layout.layers)
    return m * layout.width * itemsize, inverse * itemsize


def _diagonal_memory(layout: BlockLayout, m: int, itemsize: int) -> tuple[int, int]:
    """m gradients of the padded width and one diagonal."""
    return m * layout.width * itemsize, layout.width * itemsize


def _kfac_memory(layout: BlockLayout, m: int, itemsize: int) -> tuple[int, int]:
    """No gradients kept; per layer the factors B (out × out), A (in × in) and their eigenvectors."""
    inverse = sum(2 * (layer.shape[0] ** 2 + math.prod(layer.shape[1:]) ** 2) for layer in layout.layers)
    return 0, inverse * itemsize


def _hessian_memory(layout: BlockLayout, m: int, itemsize: int) -> tuple[int, int]:
    """The Hessian over the padded width, its eigenvectors and the inverse."""
    return 0, 3 * layout.width**2 * itemsize


_NO_DATA = {"needs_data": False, "needs_gradients": False, "needs_labels": False}

METHODS: dict[Method, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo(Method.WOODFISHER, lambda f, c: WoodFisher(f, c), _block_memory, uses_blocks=True),
        MethodInfo(
            Method.WOODTAYLOR, lambda f, c: WoodFisher(f, c, taylor=True), _block_memory, taylor=True, uses_blocks=True
        ),
        MethodInfo(
            Method.MAGNITUDE,
            _identity,
            _no_memory,
            **_NO_DATA,
            default_scope=Scope.LAYER,
            scopes=frozenset({Scope.LAYER}),
        ),
        MethodInfo(Method.GLOBAL_MAGNITUDE, _identity, _no_memory, **_NO_DATA),
        MethodInfo(Method.DIAG_FISHER, lambda f, c: DiagonalFisher(f), _diagonal_memory),
        MethodInfo(Method.KFAC, lambda f, c: KFAC(f), _kfac_memory, supports_joint=False),
        MethodInfo(Method.EXACT_OBS, lambda f, c: ExactHessian(lam=f.lam, loss=f.loss), _hessian_memory),
    )
}


def method_info(method: Method | str) -> MethodInfo:
    """The table entry of a method (ValueError for an unknown name)."""
    return METHODS[Method(method)]
