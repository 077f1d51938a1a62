"""What the forward of one Fisher sample saves for the backward: the activations a chunk of per-sample gradients
holds k times over.

``vmap(grad(loss))`` over a chunk of k samples keeps, until the backward is done, every tensor the forward saved for
it (the inputs of the Linear and convolution layers being differentiated, the activations' outputs, normalisation
statistics), batched over the k samples. A memory plan made from the weights' shapes alone cannot see them, and for
a convolutional network on images they can be larger than the chunk's gradients (ResNet-50 at 64 × 64: 8 MiB per
sample for its last block against 17 MiB of that block's gradients). :func:`saved_bytes_per_sample` counts them on
the ``meta`` device: shapes only, no memory, no arithmetic.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torch.func import functional_call

log = logging.getLogger(__name__)

__all__ = ["saved_bytes_per_sample"]


def _storage(t: Tensor) -> int:
    """The identity of ``t``'s storage (shared by its views); on ``meta`` there is no data pointer to compare."""
    return t.untyped_storage()._cdata


def saved_bytes_per_sample(model: nn.Module, example: Tensor, names: list[str]) -> int | None:
    """Bytes the forward of ``example`` (one Fisher sample: its b examples) saves for the backward of the parameters
    ``names``, not counting the parameters themselves; None when the model cannot run on the ``meta`` device."""
    params = dict(model.named_parameters())
    chosen = set(names)
    meta = {n: torch.empty_like(p, device="meta").requires_grad_(n in chosen) for n, p in params.items()}
    meta.update({n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()})
    seen = {_storage(t) for t in meta.values()}  # the weights are not per sample
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        key = _storage(t)
        if key not in seen:  # a tensor saved by two ops (ReLU's output, the next layer's input), or a view: once
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    x = torch.empty_like(example, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            functional_call(model, meta, (x,))
    except Exception as e:  # noqa: BLE001 (a model whose forward needs real values: the plan says it is not counted)
        log.info("activations not measured on the meta device: %s", str(e).split("\n")[0])
        return None
    return total
