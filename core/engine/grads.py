"""Fisher gradient samples with ``torch.func``: ``vmap(grad(loss))`` in memory-bounded chunks.

Sample i is the mean gradient of a Fisher mini-batch of b examples (b = 1: per-example
gradients), taken w.r.t. the selected parameters only, multiplied by the current mask, and written
straight into row i of one preallocated (m × D) buffer laid out by a ``BlockLayout``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from core.engine.buffers import large_empty
from core.engine.layout import BlockLayout
from core.engine.modes import eval_mode

log = logging.getLogger(__name__)


class Loss(str, Enum):
    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"


def loss_fn(loss: Loss | str) -> Callable[[Tensor, Tensor], Tensor]:
    if Loss(loss) is Loss.CROSS_ENTROPY:
        return F.cross_entropy
    return lambda out, y: F.mse_loss(out, y.to(out.dtype).reshape(out.shape))


@torch.no_grad()
def sample_labels(
    model: nn.Module, x: Tensor, loss: Loss | str, generator: torch.Generator, chunk: int = 512
) -> Tensor:
    """Labels drawn from the model's own predictive distribution (for the *true* Fisher)."""
    out = torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    if Loss(loss) is Loss.CROSS_ENTROPY:
        probs = out.float().softmax(-1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(x.device)
    noise = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
    return out + noise


@dataclass
class FisherSamples:
    grads: Tensor  # (m, D): row i is Fisher sample i, masked, in the layout's padded order

    @property
    def mean(self) -> Tensor:
        """(D,) mean gradient over all m·b examples: WoodTaylor's first-order term (in float32 at least)."""
        g = self.grads
        return g.mean(dim=0) if g.element_size() >= 4 else g.float().mean(dim=0)


class GradientChunks:
    """Per-sample gradients of m Fisher samples, computed ``chunk`` samples at a time.

    The m·b examples are drawn without replacement (the same draw for every pass, so passes over layer groups see
    the same samples); the model is evaluated in eval mode. Only the parameters of ``names`` (default: the
    layout's) are differentiated; every other parameter and buffer is passed as a constant.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        m: int,
        fisher_batch: int = 1,
        loss: Loss | str = Loss.CROSS_ENTROPY,
        true_fisher: bool = False,
        generator: torch.Generator | None = None,
        chunk: int = 128,
    ):
        need = m * fisher_batch
        if need > len(x):
            raise ValueError(f"m × Fisher batch = {need} examples requested, the data has {len(x)}")
        generator = generator or torch.Generator().manual_seed(0)
        idx = torch.randperm(len(x), generator=generator)[:need].to(x.device)
        xs, ys = x[idx], y[idx]
        if true_fisher:
            ys = sample_labels(model, xs, loss, generator)
        self.model, self.m, self.chunk = model, m, max(1, chunk)
        self.xs = xs.unflatten(0, (m, fisher_batch))
        self.ys = ys.unflatten(0, (m, fisher_batch))
        self.criterion = loss_fn(loss)

    def __call__(self, names: list[str]) -> Iterator[tuple[int, int, dict[str, Tensor]]]:
        """(start, stop, {name: gradients shaped (stop − start, *param.shape)}) per chunk, for the parameters
        ``names`` only."""
        params = dict(self.model.named_parameters())
        selected = {n: params[n].detach() for n in names}
        fixed = {n: p.detach() for n, p in params.items() if n not in selected}
        fixed.update(dict(self.model.named_buffers()))
        model, criterion = self.model, self.criterion

        def minibatch_loss(sel: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
            return criterion(functional_call(model, (sel, fixed), (xb,)), yb)

        per_sample = per_sample_gradients(minibatch_loss)
        with eval_mode(model):
            for start in range(0, self.m, self.chunk):
                stop = min(start + self.chunk, self.m)
                yield start, stop, per_sample(selected, self.xs[start:stop], self.ys[start:stop])


def per_sample_gradients(minibatch_loss: Callable[..., Tensor]) -> Callable[..., dict[str, Tensor]]:
    """``vmap(grad(minibatch_loss))`` over the samples; where vmap cannot trace the model (data-dependent control
    flow, in-place ops some Hugging Face models take), the same gradients one sample at a time, each copied into
    the chunk's preallocated (k, ...) tensors as it comes (a ``torch.stack`` of the k samples' gradients would hold
    them twice: 2 × k·D at the chunk's peak)."""
    vmapped = vmap(grad(minibatch_loss), in_dims=(None, 0, 0))
    single = grad(minibatch_loss)
    use_loop = False

    def run(sel: dict[str, Tensor], xs: Tensor, ys: Tensor) -> dict[str, Tensor]:
        nonlocal use_loop
        if not use_loop:
            try:
                return vmapped(sel, xs, ys)
            except (RuntimeError, NotImplementedError, ValueError) as e:
                log.info("vmap(grad) failed (%s); per-example gradients in a loop", str(e).split("\n")[0])
                use_loop = True
        out: dict[str, Tensor] = {}
        for i in range(len(xs)):  # each sample's gradients written into the chunk's tensors: never two copies
            row = single(sel, xs[i], ys[i])
            for n in sel:
                if i == 0:
                    out[n] = large_empty(len(xs), *row[n].shape, dtype=row[n].dtype, device=row[n].device)
                out[n][i].copy_(row.pop(n))
            del row
        return out

    return run


def fisher_gradients(
    model: nn.Module,
    layout: BlockLayout,
    x: Tensor,
    y: Tensor,
    *,
    m: int,
    fisher_batch: int = 1,
    loss: Loss | str = Loss.CROSS_ENTROPY,
    true_fisher: bool = False,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk: int = 128,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FisherSamples:
    """Compute m Fisher samples of b = ``fisher_batch`` examples each from (x, y) into one (m × D) buffer.

    ``mask`` is a (D,) 0/1 vector in layout order; ``progress(done, m)`` is called per chunk; ``dtype`` is the
    buffer's (default: the parameters'; bfloat16/float16 halve it).
    """
    chunks = GradientChunks(
        model,
        x,
        y,
        m=m,
        fisher_batch=fisher_batch,
        loss=loss,
        true_fisher=true_fisher,
        generator=generator,
        chunk=chunk,
    )
    params = dict(model.named_parameters())
    dtype = dtype or params[layout.names[0]].dtype
    out = large_empty(m, layout.width, dtype=dtype, device=x.device)
    for layer in layout.layers:  # block padding only; real columns are all written below
        out[:, layer.offset + layer.numel : layer.offset + layer.width] = 0
    for start, stop, g in chunks(layout.names):
        for layer in layout.layers:
            out[start:stop, layer.offset : layer.offset + layer.numel] = g[layer.name].flatten(1)
        del g
        if progress:
            progress(stop, m)
    if mask is not None and not bool(mask.all()):
        out.mul_(mask.to(dtype))
    return FisherSamples(out)
