"""The pruning methods: the one table that says what each method is and what a run of it needs.

A method is a curvature estimator plus its rules: the scopes it thresholds over, whether it takes the joint
OBS update, whether it uses the first-order term, what it draws from the data and how much memory its estimate
takes. The pruner, the memory plan and the spec's validation read this table; a new method is one entry here.

Memory comes in two formulas. ``memory`` is what the estimate holds (the Fisher gradients, the inverse
blocks), the numbers a person tunes with ``fisher.samples`` and ``fisher.block_size``. ``peak`` is the most a
pruning step holds at once, on top of the loaded model and data: the estimate's phases (gradients of a vmap
chunk, each block's Gram matrix while it is factored, K-FAC's eigensolver, the Hessian's batches) and the OBS
step's own vectors. Both follow the engine's code allocation by allocation; ``tests/test_memory_plans.py``
measures the peak of a real step of every method against ``peak`` (within ±50 %).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from core.engine.curvature.base import CurvatureEstimator, FisherConfig
from core.engine.curvature.fisher import DiagonalFisher, Identity, WoodFisher
from core.engine.curvature.hessian import MAX_WEIGHTS, ExactHessian
from core.engine.curvature.hessian import peak_bytes as hessian_peak_bytes
from core.engine.curvature.inverse import gram_slice_bytes
from core.engine.curvature.kfac import KFAC
from core.engine.layerwise.obc import held_bytes, obc
from core.engine.layerwise.sparsegpt import sparsegpt
from core.engine.layerwise.wanda import wanda
from core.engine.layout import BlockLayout, LayerSlice
from core.engine.obs import Scope


class Method(str, Enum):
    WOODFISHER = "woodfisher"
    WOODTAYLOR = "woodtaylor"
    MAGNITUDE = "magnitude"
    GLOBAL_MAGNITUDE = "global_magnitude"
    DIAG_FISHER = "diag_fisher"
    KFAC = "kfac"
    EXACT_OBS = "exact_obs"
    SPARSEGPT = "sparsegpt"
    OBC = "obc"
    WANDA = "wanda"


#: a method's estimator from the Fisher sampling settings and the block size (None: one block per layer)
EstimatorFactory = Callable[[FisherConfig, int | None], CurvatureEstimator]
#: (gradient bytes, inverse bytes) a method's estimate holds at its peak, from the layout, m and the item size
MemoryFormula = Callable[[BlockLayout, int, int], tuple[int, int]]


@dataclass(frozen=True)
class Sizing:
    """What a pruning step's peak memory depends on besides the layout."""

    m: int  # Fisher samples
    itemsize: int  # bytes per element of the run's dtype
    chunk: int = 64  # Fisher samples per vmap chunk (fisher.chunk)
    joint: bool = False  # the joint OBS update (its solve factors P F⁻¹ P per block)
    #: the widest layer group differentiated in one pass, in chunk elements per sample (``chunk_elements``; streamed
    #: path; None: all layers)
    chunk_width: int | None = None
    #: bytes the forward of one Fisher sample saves for the backward (``core.engine.activations``; 0: not known)
    activations: int = 0


#: bytes a pruning step holds at its peak, on top of the model and the data
PeakFormula = Callable[[BlockLayout, Sizing], int]

#: vectors of the padded width the pruner and the OBS step hold at once besides the curvature: the flat mask
#: and weights, the saliencies, shifted weights and keep mask, top-k's (value, index) pairs and the update's
#: vectors (measured: 10.6 with a global threshold, the most)
STEP_VECTORS = 11
#: per-example gradients of one vmap chunk, in chunk × D elements: the chunk and the autograd temporaries (measured
#: 1.04 with vmap on an MLP, k = 32; 1.16 on MiniLM, whose in-place ops take the per-sample loop, k = 16)
VMAP_CHUNK_FACTOR = 1.5
#: the same for convolution weights: vmap's per-sample weight gradient of a convolution is a grouped convolution
#: whose output is copied once more (measured 1.85 on ResNet-50's last block at k = 16)
VMAP_CONV_FACTOR = 2.0
#: a chunk's activations, in multiples of what the forward of its samples saves for the backward (the saved
#: tensors, and the backward's gradients with respect to them; measured 1.9 on ResNet-50's first stage at 64 × 64,
#: 2.8–3.0 on two 3 × 3 convolutions at 64 × 64, both k = 16–32; tests/test_activations.py)
ACTIVATION_FACTOR = 3.5


def chunk_elements(layers: Iterable[LayerSlice]) -> int:
    """Per sample, the elements one chunk of per-sample gradients of these layers holds (``VMAP_CHUNK_FACTOR`` ×
    the width of a Linear, ``VMAP_CONV_FACTOR`` × that of a convolution)."""
    return math.ceil(sum((VMAP_CONV_FACTOR if len(x.shape) > 2 else VMAP_CHUNK_FACTOR) * x.width for x in layers))


def _chunk_bytes(layout: BlockLayout, z: Sizing) -> int:
    """One vmap chunk at its peak: its per-sample gradients and its activations."""
    width = z.chunk_width if z.chunk_width is not None else chunk_elements(layout.layers)
    return min(z.chunk, z.m) * (width * z.itemsize + math.ceil(ACTIVATION_FACTOR * z.activations))


@dataclass(frozen=True)
class MethodInfo:
    """One pruning method: how its curvature is estimated and the rules a run of it follows."""

    name: Method
    estimator: EstimatorFactory
    memory: MemoryFormula
    peak: PeakFormula
    needs_data: bool = True  # draws training examples (fisher.samples × fisher.batch_size) for its estimate
    needs_gradients: bool = True  # differentiates the loss at those examples
    needs_labels: bool = True  # reads their labels
    default_scope: Scope = Scope.GLOBAL
    scopes: frozenset[Scope] = frozenset(Scope)  # the scopes it may threshold over
    supports_joint: bool = True  # takes the joint OBS update; else the summed one only
    taylor: bool = False  # uses the first-order term (the mean gradient) in the OBS step
    uses_blocks: bool = False  # block-diagonal in fisher.block_size blocks, which a memory budget may shrink
    max_weights: int | None = None  # the most weights it takes (exact OBS: the Hessian is D × D)
    #: layer-wise from calibration inputs (core.engine.layerwise): the layer solver; the estimator is unused
    layerwise: Callable | None = None
    #: λ and R (recompute sub-steps) when the spec sets none, measured per method (bench/defaults.py)
    default_lambda: float = 1e-5
    default_recompute: int = 16
    #: takes a relative λ (α × its estimate's mean diagonal over the live weights; ``FisherConfig.lam_scale``)
    relative_lambda: bool = False
    #: α of the default relative λ; None: the default is the absolute ``default_lambda``
    default_lambda_relative: float | None = None
    #: α of the default relative λ with a structure (group_saliency "fisher"); None: ``default_lambda_relative``
    structured_lambda_relative: float | None = None
    #: the default λ is 'auto' (chosen per job by the one-shot sweep on the calibration split) on this scale's grid;
    #: None: the fixed default above. For the methods whose prune is cheap enough to repeat (kfac, diag_fisher)
    default_lambda_sweep: Literal["absolute", "relative"] | None = None
    #: R = 'auto' (the same sweep, after λ) tries the sweep grid up to this R: the sweep's cost grows with R
    recompute_sweep_max: int = 16
    #: the default R is 'auto' (no method: on kfac and diag_fisher it did not pay on the means, README, Defaults)
    default_recompute_sweep: bool = False
    #: (memory, peak) of the streamed path (Gram matrices accumulated per chunk, ``curvature/streaming.py``), for
    #: the methods that have one; the memory plan chooses the path
    streamed: tuple[MemoryFormula, PeakFormula] | None = None
    #: structured pruning (whole neurons, channels, heads; core.engine.structured): how groups are scored, "obs"
    #: (OBS group saliency on the layer-wise input Hessian, with the joint update), "fisher" (OBS group saliency on
    #: the method's Fisher blocks of the consumer's weights, with the update; core.engine.structured.fisher) or "l2"
    #: (group norm, no update); None: the method has no structured form
    group_saliency: str | None = None

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


def _dense(c: int, m: int) -> bool:
    """A block is kept as its dense c×c inverse when c ≤ m, else in the Woodbury form (m × c)."""
    return c <= m


def _block_memory(layout: BlockLayout, m: int, itemsize: int) -> tuple[int, int]:
    """m gradients of the padded width; per block a dense c×c inverse (c ≤ m), or the Woodbury m×c factor and its
    m×m Gram matrix (c > m)."""

    def per_block(c: int) -> int:
        return c * c if _dense(c, m) else m * c + m * m

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


def _step(layout: BlockLayout, z: Sizing) -> int:
    """The pruner's and the OBS step's own vectors (see ``STEP_VECTORS``)."""
    return STEP_VECTORS * layout.width * z.itemsize


def _gradients(layout: BlockLayout, z: Sizing) -> tuple[int, int]:
    """(the m × D gradient buffer, the largest transient while it is filled: one vmap chunk's gradients)."""
    return z.m * layout.width * z.itemsize, _chunk_bytes(layout, z)


def _magnitude_peak(layout: BlockLayout, z: Sizing) -> int:
    """A diagonal of ones and the step."""
    return layout.width * z.itemsize + _step(layout, z)


def _block_inverses(layout: BlockLayout, z: Sizing) -> tuple[int, int, int]:
    """(every block's inverse, one layer's Gram matrices while they are factored (c×c dense; m×m Woodbury), one
    layer's joint solve (dense: 4 c×c per block, for P F⁻¹ P, the identity, their sum and its factor; Woodbury: W_P
    and 3 m×m))."""
    s, m = z.itemsize, z.m
    held = build = joint = 0
    for layer in layout.layers:
        nb, c = layer.nb, layer.block
        if _dense(c, m):
            held += nb * c * c * s
            build, joint = max(build, nb * c * c * s), max(joint, 4 * nb * c * c * s)
        else:
            held += nb * m * c * s
            build, joint = max(build, nb * m * m * s), max(joint, nb * (m * c + 3 * m * m) * s)
    return held, build, joint


def _block_step(layout: BlockLayout, z: Sizing, held: int, joint: int) -> int:
    """The OBS step: the inverses, the step's vectors, the mean gradient and, for the joint update, one layer's
    solve."""
    return held + _step(layout, z) + layout.width * z.itemsize + (joint if z.joint else 0)


def _block_peak(layout: BlockLayout, z: Sizing) -> int:
    """Estimate: the flat mask, the gradients and, the larger of, a vmap chunk, or every block's inverse plus one
    layer's Gram matrices while they are factored; then the OBS step (``_block_inverses``, ``_block_step``)."""
    held, build, joint = _block_inverses(layout, z)
    gradients, chunk = _gradients(layout, z)
    vector = layout.width * z.itemsize
    estimate = vector + gradients + max(chunk, held + build)
    return max(estimate, _block_step(layout, z, held, joint))


def _woodbury_rows(layout: BlockLayout, m: int, itemsize: int) -> int:
    """The gradient rows the streamed path keeps: m × width of every layer whose blocks are Woodbury (c > m)."""
    return sum(m * layer.width for layer in layout.layers if not _dense(layer.block, m)) * itemsize


def _streamed_memory(layout: BlockLayout, m: int, itemsize: int) -> tuple[int, int]:
    """Streamed: gradient rows of the Woodbury layers only; the blocks as in ``_block_memory`` (the dense ones are
    their accumulated Gram matrices while the gradients stream, then their inverses)."""
    return _woodbury_rows(layout, m, itemsize), _block_memory(layout, m, itemsize)[1]


def _streamed_peak(layout: BlockLayout, z: Sizing) -> int:
    """Streamed estimate: the mask and the gradient sum, the Woodbury rows, every block (Gram matrices, then
    inverses) and the larger of one chunk of per-example gradients and activations (``_chunk_bytes``: k × the
    widest group's ``chunk_elements``) or one layer's factorization (dense layers: a slice of blocks, inverted in
    place, see ``gram_slice_bytes``; Woodbury layers: their m × m Gram matrices); then the OBS step as buffered."""
    held, _build, joint = _block_inverses(layout, z)
    build = max(
        gram_slice_bytes(layer.nb, layer.block, z.itemsize)
        if _dense(layer.block, z.m)
        else layer.nb * z.m * z.m * z.itemsize
        for layer in layout.layers
    )
    chunk = _chunk_bytes(layout, z)
    estimate = 2 * layout.width * z.itemsize + _woodbury_rows(layout, z.m, z.itemsize) + held + max(chunk, build)
    return max(estimate, _block_step(layout, z, held, joint))


def _diagonal_peak(layout: BlockLayout, z: Sizing) -> int:
    """Estimate: the mask, the gradients and their squares (mean(g²) squares the m × D buffer); step: the diagonal
    and the step's vectors."""
    gradients, chunk = _gradients(layout, z)
    vector = layout.width * z.itemsize
    return max(vector + gradients + max(chunk, gradients + vector), vector + _step(layout, z))


def _kfac_peak(layout: BlockLayout, z: Sizing) -> int:
    """Factors: B and A of every layer, the weights' .grad of the backward passes and one factor's product.
    Eigendecompositions (in float64, one factor at a time): the factors, the eigenvectors so far and, for the
    largest factor n × n, its float64 copy, eigenvectors and syevd's 2 n² workspace, and the cast back.
    Step: the eigenvectors, the step's vectors and one layer's diagonal of F⁻¹ (4 out × in temporaries)."""
    s = z.itemsize
    sides = [(layer.shape[0], math.prod(layer.shape[1:])) for layer in layout.layers]
    factors = sum(o * o + i * i for o, i in sides) * s
    largest = max(max(o, i) for o, i in sides)
    vector = layout.width * s
    collect = vector + factors + vector + largest * largest * s
    eigh = vector + 2 * factors + largest * largest * ((8 if s != 8 else 0) + 8 + 16 + s)
    step = factors + _step(layout, z) + 4 * max(layer.numel for layer in layout.layers) * s
    return max(collect, eigh, step)


def _hessian_peak(layout: BlockLayout, z: Sizing) -> int:
    """Estimate: the mask and the Hessian's own peak (core.engine.curvature.hessian.peak_bytes); step: the D×D
    inverse, the step's vectors and, for the joint update, 4 D×D temporaries of its solve."""
    d2 = layout.width**2 * z.itemsize
    estimate = layout.width * z.itemsize + hessian_peak_bytes(layout.width, z.itemsize)
    return max(estimate, d2 + _step(layout, z) + (4 * d2 if z.joint else 0))


def _layerwise_memory(layout: BlockLayout, m: int, itemsize: int) -> tuple[int, int]:
    """No gradients; the input Hessians H (d_in × d_in) of the layers, at most all of them (one group's are held)."""
    return 0, sum(math.prod(layer.shape[1:]) ** 2 for layer in layout.layers) * itemsize


def _layerwise_peak(layout: BlockLayout, z: Sizing, solver: str = "sparsegpt") -> int:
    """The Hessians (all layers': an upper bound on one group's), every layer's keep-mask (returned at the end), and
    the largest layer's solve: SparseGPT the float64 factorisation (at most four d × d matrices at once,
    ``hessian.inverse_factor``) and three copies of its weights; OBC the factorisation or H⁻¹ and U with its row
    batch's factors (``obc.held_bytes``, for a target of every input: an upper bound, the sparsity is not known
    here), and three float64 copies of its weights; Wanda four copies of its weights (scores, |W|, the pruned copy,
    the new weights). Not counted: one calibration batch's activations (the plan knows no input shapes; a few MiB
    for the models of tests/test_memory_plans.py, tens of MiB for a transformer block at batch 16)."""
    hessians = _layerwise_memory(layout, z.m, z.itemsize)[1]
    masks = sum(layer.numel for layer in layout.layers) * z.itemsize

    def solve(layer) -> int:
        d, numel = math.prod(layer.shape[1:]), layer.numel
        if solver == "wanda":
            return 4 * numel * z.itemsize
        if solver == "obc":
            return max(4 * d * d * 8, 2 * d * d * 8 + held_bytes(layer.shape[0], d, d)) + 3 * numel * 8
        return 4 * d * d * 8 + 3 * numel * z.itemsize

    return hessians + masks + max(solve(layer) for layer in layout.layers)


def _layerwise(name: Method, solver: Callable, group_saliency: str | None = None) -> MethodInfo:
    return MethodInfo(
        name,
        _identity,
        _layerwise_memory,
        lambda layout, z: _layerwise_peak(layout, z, name.value),
        needs_gradients=False,
        needs_labels=False,
        default_scope=Scope.LAYER,
        scopes=frozenset({Scope.LAYER}),
        supports_joint=False,
        layerwise=solver,
        group_saliency=group_saliency,
    )


_NO_DATA = {"needs_data": False, "needs_gradients": False, "needs_labels": False}

METHODS: dict[Method, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo(
            Method.WOODFISHER,
            lambda f, c: WoodFisher(f, c),
            _block_memory,
            _block_peak,
            uses_blocks=True,
            relative_lambda=True,
            default_lambda_relative=0.1,  # λ = 0.1 × mean diag F̂ (bench/defaults.py, bench/hf_quality.py)
            streamed=(_streamed_memory, _streamed_peak),
            group_saliency="fisher",
            structured_lambda_relative=1e-3,  # bench/structured.py --only saliency: 0.1 → 1e-3 gains 0.8–2.7 points
        ),
        MethodInfo(
            Method.WOODTAYLOR,
            lambda f, c: WoodFisher(f, c, taylor=True),
            _block_memory,
            _block_peak,
            taylor=True,
            uses_blocks=True,
            relative_lambda=True,
            default_lambda=1e-1,  # its Newton step is long at small λ (README, Quality)
            streamed=(_streamed_memory, _streamed_peak),
        ),
        MethodInfo(
            Method.MAGNITUDE,
            _identity,
            _no_memory,
            _magnitude_peak,
            **_NO_DATA,
            default_scope=Scope.LAYER,
            scopes=frozenset({Scope.LAYER}),
            group_saliency="l2",
        ),
        MethodInfo(Method.GLOBAL_MAGNITUDE, _identity, _no_memory, _magnitude_peak, **_NO_DATA),
        MethodInfo(
            Method.DIAG_FISHER,
            lambda f, c: DiagonalFisher(f),
            _diagonal_memory,
            _diagonal_peak,
            relative_lambda=True,
            default_lambda=1e-4,  # the fixed λ a spec's 'lambda_scale: absolute' alone falls back to
            default_lambda_sweep="absolute",  # fixed λs: −0.7 at MLP 70 %, the sweep +5.5 at 90 % (README, Defaults)
            recompute_sweep_max=64,
        ),
        MethodInfo(
            Method.KFAC,
            lambda f, c: KFAC(f),
            _kfac_memory,
            _kfac_peak,
            supports_joint=False,
            relative_lambda=True,
            default_lambda=1e-3,
            default_lambda_sweep="absolute",  # no fixed λ serves 80 and 90 % (README, Defaults: bench/defaults.py)
            default_recompute=64,  # its estimate is cheap: more sub-steps pay
            recompute_sweep_max=64,
        ),
        MethodInfo(
            Method.EXACT_OBS,
            lambda f, c: ExactHessian(lam=f.lam, loss=f.loss),
            _hessian_memory,
            _hessian_peak,
            max_weights=MAX_WEIGHTS,
        ),
        _layerwise(Method.SPARSEGPT, sparsegpt, group_saliency="obs"),
        _layerwise(Method.OBC, obc, group_saliency="obs"),
        _layerwise(Method.WANDA, wanda),
    )
}


def method_info(method: Method | str) -> MethodInfo:
    """The table entry of a method (ValueError for an unknown name)."""
    return METHODS[Method(method)]
