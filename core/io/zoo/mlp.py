"""Multi-layer perceptron: the smallest model family, and the one WoodFisher's MNIST results use."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}


class MLP(nn.Module):
    """Multi-layer perceptron ``Flatten → (Linear → act)* → Linear``.

    The input is flattened first so the same model takes (N, 784) vectors or (N, 1, 28, 28)
    images; ``in_features`` must equal the flattened size.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (256, 128),
        num_classes: int = 10,
        activation: str = "relu",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        widths = [int(in_features), *(int(h) for h in hidden), int(num_classes)]
        if any(w < 1 for w in widths):
            raise ValueError("in_features, hidden sizes and num_classes must be ≥ 1")
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
