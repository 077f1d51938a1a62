"""Exact OBS: the full Hessian of the loss over all selected weights (tiny models only).

The Hessian is accumulated over the data in batches, a block of its rows at a time: each block is the
vector-Jacobian product of the batch's gradient with rows of the identity, vmapped over the rows. So the memory
it takes beyond the D×D result is bounded by :func:`work_bytes` whatever the number of examples — where
``torch.func.hessian`` over the whole training set vmaps D forward-mode tangents through every example at once
(gigabytes for the README's 64-64-10 MLP on the digits). :func:`peak_bytes` is what the memory plan counts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from core.engine.curvature.base import Curvature, Progress
from core.engine.curvature.inverse import DenseInverse, Segment
from core.engine.grads import Loss, loss_fn
from core.engine.layout import BlockLayout
from core.engine.modes import eval_mode
from core.errors import InvalidInput

#: the most weights exact OBS takes (its Hessian is D×D, its cost D × the examples × a backward pass)
MAX_WEIGHTS = 5000
#: the least working memory the batches may take (below it, batches would be needlessly small and slow)
MIN_WORK_BYTES = 64 * 2**20
#: floats the double-backward of one (example, row) pair keeps per activation of the example (measured on MLPs:
#: 1.1 to 1.3)
PAIR_FLOATS_PER_ACTIVATION = 2


def _libc_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _libc_malloc_trim()


def release_free_memory() -> None:
    """Hands the allocator's free memory back to the system (glibc's ``malloc_trim``; elsewhere nothing). The
    batches' freed intermediates (each under glibc's 32 MiB mmap threshold, so on the heap) would otherwise stay
    resident beside the eigensolver's fresh allocations, and the process's peak would exceed the plan."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def work_bytes(width: int, itemsize: int) -> int:
    """Bytes the Hessian's batches may take beyond the Hessian: 3 D² (at least 64 MiB), the room the eigensolver
    needs later anyway, so that bounding the batches adds nothing to the peak."""
    return max(3 * width * width * itemsize, MIN_WORK_BYTES)


def peak_bytes(width: int, itemsize: int) -> int:
    """The estimate's peak: the Hessian and a batch's work while accumulating; then the Hessian, its eigenvectors
    and the eigensolver's workspace (2 D², LAPACK's syevd); then the eigenvectors and the inverse."""
    d2 = width * width * itemsize
    return max(d2 + work_bytes(width, itemsize), 4 * d2)


def activations_per_example(model: nn.Module, x1: Tensor) -> int:
    """Elements of one example and of every leaf module's output for it (the forward pass's activations)."""
    total = x1[:1].numel()

    def count(_mod: nn.Module, _inp: object, out: object) -> None:
        nonlocal total
        if isinstance(out, Tensor):
            total += out.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad(), eval_mode(model):
            model(x1[:1])
    finally:
        for h in hooks:
            h.remove()
    return max(total, 1)


def batching(width: int, activations: int, examples: int, itemsize: int) -> tuple[int, int]:
    """(rows, examples) per vmapped product. Their live bytes are kept to half of :func:`work_bytes`: the many
    intermediates of the vmapped double backward, freed and allocated again batch after batch, fragment the heap
    (peaks up to 1.7× the live bytes measured with glibc's allocator). Of that half, a quarter goes to the rows'
    one-hot inputs and outputs (2 × rows × D), the rest to the intermediates (rows × examples × activations); fewer
    rows when a single example's would not fit."""
    live = work_bytes(width, itemsize) // 2
    pair = activations * PAIR_FLOATS_PER_ACTIVATION * itemsize  # one (example, row) pair's intermediates
    rows = max(1, min(width, live // 4 // (2 * width * itemsize), live * 3 // 4 // pair))
    return rows, max(1, min(examples, live * 3 // 4 // (rows * pair)))


def loss_hessian(
    model: nn.Module,
    layout: BlockLayout,
    x: Tensor,
    y: Tensor,
    loss: Loss | str,
    progress: Progress | None = None,
) -> tuple[Tensor, Tensor]:
    """(H, g): Hessian and gradient of the mean loss over (x, y) w.r.t. the flat selected weights."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    criterion = loss_fn(loss)
    flat0 = layout.flatten({n: params[n] for n in layout.names})
    width, n = flat0.numel(), len(x)
    rows, batch = batching(width, activations_per_example(model, x[:1]), n, flat0.element_size())

    def batch_loss(flat: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return criterion(functional_call(model, ({**params, **layout.unflatten(flat)}, buffers), (xb,)), yb)

    h = torch.zeros(width, width, dtype=flat0.dtype, device=flat0.device)
    g = torch.zeros_like(flat0)
    onehot = torch.zeros(rows, width, dtype=flat0.dtype, device=flat0.device)  # rows of the identity, reused
    diagonal = torch.arange(rows, device=flat0.device)
    steps = -(-n // batch) * -(-width // rows)
    done = 0
    with eval_mode(model):
        for start in range(0, n, batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            share = len(xb) / n  # the batch's mean loss, weighted into the mean over all examples
            gb, row_of = vjp(lambda flat, xb=xb, yb=yb: grad(batch_loss)(flat, xb, yb), flat0)
            g.add_(gb, alpha=share)
            for r in range(0, width, rows):
                k = min(rows, width - r)
                onehot.zero_()
                onehot[diagonal[:k], diagonal[:k] + r] = 1
                (block,) = vmap(row_of)(onehot[:k])  # rows r..r+k of the batch's Hessian (it is symmetric)
                h[r : r + k].add_(block, alpha=share)
                del block
                done += 1
                if progress:
                    progress(done, steps)
            del row_of
            release_free_memory()  # the batch's freed intermediates, before the next batch's are allocated
    return h, g


@dataclass
class ExactHessian:
    """One block over all weights; eigenvalues clamped at λ so H⁻¹ exists off a minimum."""

    lam: float = 1e-6
    loss: Loss = Loss.CROSS_ENTROPY
    max_weights: int = MAX_WEIGHTS
    block_size: int | None = None

    def estimate(
        self, model: nn.Module, layout: BlockLayout, mask: Tensor, data, progress: Progress | None = None
    ) -> Curvature:
        if layout.width > self.max_weights:
            raise InvalidInput(
                f"exact OBS is for tiny models: {layout.width} weights > {self.max_weights}; use woodfisher",
                errors=[
                    {"loc": ["spec", "method"], "msg": f"at most {self.max_weights} weights", "type": "value_error"}
                ],
            )
        x, y = data
        h, g = loss_hessian(model, layout, x.to(mask.dtype), y, self.loss, progress)
        release_free_memory()
        evals, evecs = torch.linalg.eigh(h.to(mask.dtype))
        del h
        # H⁻¹ = V Λ⁻¹ Vᵀ = (V Λ^-½)(V Λ^-½)ᵀ: scaled in place, one D×D product (no third D×D temporary)
        evecs.mul_(evals.clamp_min(self.lam).rsqrt())
        inv = evecs @ evecs.T
        del evecs
        return Curvature([Segment(0, DenseInverse(inv.unsqueeze(0)))], grad=g.to(mask.dtype) * mask)
