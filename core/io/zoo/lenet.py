"""LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, sized from ``input_size``.

The classic net assumes 32×32 inputs (MNIST's 28×28 is padded by 2 to match). Here each 5×5
convolution is padded by 2 whenever its input is too small for the unpadded one, so the same
module serves 8×8 sklearn digits, 28×28 MNIST and 32×32 CIFAR. The flattened size is computed at
construction, so ``forward`` holds no shape-dependent Python logic (vmap- and export-friendly). ``channels`` (the two
convolutions' outputs) and ``fc`` (the two hidden fully connected widths) default to the paper's; structured pruning
(:mod:`core.engine.structured`) returns smaller ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def _conv_pool(size: int, min_size: int) -> tuple[int, int]:
    """(padding, pooled size) of a 5×5 conv + 2×2 max-pool; pad by 2 when ``size < min_size``."""
    pad = 0 if size >= min_size else 2
    return pad, (size + 2 * pad - 4) // 2


class LeNet5(nn.Module):
    """LeNet-5: two 5×5 conv + max-pool stages and three fully connected layers (120, 84, classes)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        channels: Sequence[int] = (6, 16),
        fc: Sequence[int] = (120, 84),
    ):
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        f1, f2 = (int(f) for f in fc)
        if min(c1, c2, f1, f2) < 1:
            raise ValueError("channels and fc widths must be ≥ 1")
        p1, s1 = _conv_pool(int(input_size), 32)  # 32 → 14, 28 → 14 (padded), 8 → 4 (padded)
        p2, s2 = _conv_pool(s1, 10)  # 14 → 5, 4 → 2 (padded)
        if s2 < 1:
            raise ValueError(f"input_size {input_size} is too small for LeNet-5 (need ≥ 4)")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=p1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=p2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(c2 * s2 * s2, f1),
            nn.ReLU(),
            nn.Linear(f1, f2),
            nn.ReLU(),
            nn.Linear(f2, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
