"""Fisher gradient samples with ``torch.func``: ``vmap(grad(loss))`` in memory-bounded chunks.

Sample i is the mean gradient of a Fisher mini-batch of b examples (b = 1: per-example
gradients), taken w.r.t. the selected parameters only, multiplied by the current mask, and written
straight into row i of one preallocated (m × D) buffer laid out by a ``BlockLayout``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from core.engine.buffers import large_empty
from core.engine.layout import BlockLayout
from core.engine.modes import eval_mode


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
        """(D,) mean gradient over all m·b examples: WoodTaylor's first-order term."""
        return self.grads.mean(dim=0)


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
    """Compute m Fisher samples of b = ``fisher_batch`` examples each from (x, y).

    The m·b examples are drawn without replacement; the model is evaluated in eval mode.
    ``mask`` is a (D,) 0/1 vector in layout order; ``progress(done, m)`` is called per chunk.
    """
    need = m * fisher_batch
    if need > len(x):
        raise ValueError(f"m × Fisher batch = {need} examples requested, the data has {len(x)}")
    generator = generator or torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=generator)[:need].to(x.device)
    xs, ys = x[idx], y[idx]
    if true_fisher:
        ys = sample_labels(model, xs, loss, generator)
    xs = xs.unflatten(0, (m, fisher_batch))
    ys = ys.unflatten(0, (m, fisher_batch))

    params = dict(model.named_parameters())
    selected = {n: params[n].detach() for n in layout.names}
    fixed = {n: p.detach() for n, p in params.items() if n not in selected}
    fixed.update(dict(model.named_buffers()))
    criterion = loss_fn(loss)

    def minibatch_loss(sel: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return criterion(functional_call(model, (sel, fixed), (xb,)), yb)

    per_sample = vmap(grad(minibatch_loss), in_dims=(None, 0, 0))
    dtype = dtype or next(iter(selected.values())).dtype
    out = large_empty(m, layout.width, dtype=dtype, device=xs.device)
    for layer in layout.layers:  # block padding only; real columns are all written below
        out[:, layer.offset + layer.numel : layer.offset + layer.width] = 0
    with eval_mode(model):
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            g = per_sample(selected, xs[start:stop], ys[start:stop])
            for layer in layout.layers:
                out[start:stop, layer.offset : layer.offset + layer.numel] = g[layer.name].flatten(1)
            if progress:
                progress(stop, m)
    if mask is not None and not bool(mask.all()):
        out.mul_(mask.to(dtype))
    return FisherSamples(out)
