"""Where each pruned parameter lives in the flat, block-padded weight vector.

Layer ``l`` with ``n_l`` weights (flattened row-major, as ``param.flatten()``) is cut into
``nb_l = ceil(n_l / c_l)`` blocks of ``c_l = min(c, n_l)`` consecutive weights; the last block is
zero-padded to ``c_l``. A block never crosses a layer. Zero-padded coordinates have zero gradient,
so they decouple exactly (F = λ there) and never take part in pruning (``valid`` is False).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class LayerSlice:
    name: str
    shape: tuple[int, ...]
    numel: int
    block: int
    nb: int
    offset: int

    @property
    def width(self) -> int:
        return self.nb * self.block

    def blocks(self, flat: Tensor) -> Tensor:
        """This layer's part of a flat (…, D) tensor as (…, nb, c) — a view."""
        return flat[..., self.offset : self.offset + self.width].unflatten(-1, (self.nb, self.block))


class BlockLayout:
    """Selected parameters laid out in blocks of ``block_size`` (``None``: one block per layer)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], block_size: int | None):
        if block_size is not None and block_size < 1:
            raise ValueError("block size must be ≥ 1")
        self.block_size = block_size
        self.layers: list[LayerSlice] = []
        offset = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            c = n if block_size is None else min(block_size, n)
            nb = math.ceil(n / c)
            self.layers.append(LayerSlice(name, tuple(shape), n, c, nb, offset))
            offset += nb * c
        self.width = offset

    @classmethod
    def for_model(cls, model: nn.Module, names: list[str], block_size: int | None) -> BlockLayout:
        params = dict(model.named_parameters())
        return cls({n: tuple(params[n].shape) for n in names}, block_size)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    def flatten(self, tensors: dict[str, Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """Concatenate per-layer tensors into the padded (D,) vector (padding is zero)."""
        first = tensors[self.layers[0].name]
        out = torch.zeros(self.width, dtype=dtype or first.dtype, device=first.device)
        for layer in self.layers:
            out[layer.offset : layer.offset + layer.numel] = tensors[layer.name].reshape(-1)
        return out

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {
            layer.name: flat[layer.offset : layer.offset + layer.numel].reshape(layer.shape) for layer in self.layers
        }

    def valid(self, device: torch.device | str | None = None) -> Tensor:
        """True on real weights, False on block padding."""
        out = torch.zeros(self.width, dtype=torch.bool, device=device)
        for layer in self.layers:
            out[layer.offset : layer.offset + layer.numel] = True
        return out


def select_parameters(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[str]:
    """Names of the parameters to prune.

    Default: the ``weight`` of every Linear/Conv1d/Conv2d. ``include`` replaces the default by
    glob patterns over parameter names (``"features.*.weight"``); ``exclude`` keeps matches dense.
    """
    if include:
        names = [n for n, _ in model.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in include)]
    elif hasattr(model, "default_prunable_names"):  # a model that knows its own (core.io.hf: transformer blocks)
        names = list(model.default_prunable_names())
    else:
        names = [
            f"{mod_name}.weight" if mod_name else "weight"
            for mod_name, mod in model.named_modules()
            if isinstance(mod, PRUNABLE)
        ]
    if exclude:
        names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    return names
