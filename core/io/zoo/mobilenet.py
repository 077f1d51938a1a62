"""MobileNetV1 (Howard et al. 2017): a 3×3 stem and 13 depthwise-separable blocks.

Each block is a 3×3 depthwise conv (``groups = channels``) and a 1×1 pointwise conv, each with
BN + ReLU. ``width_mult`` (the paper's α) thins every layer; channels are floored at 8.
``small_input`` makes the stem stride 1 for 32×32 inputs (CIFAR), as is usual.
"""

from __future__ import annotations

from torch import Tensor, nn

# (output channels, stride) of the 13 depthwise-separable blocks
_CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class MobileNetV1(nn.Module):
    """MobileNetV1 with width multiplier ``width_mult`` (α)."""

    def __init__(
        self, in_channels: int = 3, num_classes: int = 1000, width_mult: float = 1.0, small_input: bool = False
    ):
        super().__init__()
        if width_mult <= 0:
            raise ValueError("width_mult must be > 0")

        def ch(c: int) -> int:
            return max(8, int(c * width_mult))

        c_in = ch(32)
        layers = [_conv_bn(in_channels, c_in, 3, 1 if small_input else 2)]
        for c, s in _CFG:
            layers.append(nn.Sequential(_conv_bn(c_in, c_in, 3, s, groups=c_in), _conv_bn(c_in, ch(c), 1, 1)))
            c_in = ch(c)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))
