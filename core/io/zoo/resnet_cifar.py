"""CIFAR ResNets of He et al. 2016 (§4.2): depth 6n+2, three stages of n basic blocks.

Stage widths are ``width``, 2·``width``, 4·``width`` (16/32/64 in the paper; ResNet-20 then has
≈0.27M parameters). Where a block halves the resolution and doubles the width the shortcut is
either option **A** (the paper's CIFAR choice: stride-2 subsampling and zero-padding of the new
channels, no parameters) or option **B** (a 1×1 convolution + BN projection).

``inner`` gives each block's inner width (``conv1``'s output channels, ``conv2``'s input channels; default: the
stage width): what structured channel pruning shrinks (:mod:`core.engine.structured`), so that the smaller model is
this constructor with ``inner`` and loads its ``pruned.safetensors`` as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class _PadShortcut(nn.Module):
    """Option A: ``x[:, :, ::2, ::2]`` zero-padded from ``c_in`` to ``c_out`` channels (out-of-place)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.before = (c_out - c_in) // 2
        self.after = c_out - c_in - self.before

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.before, self.after))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str, inner: int | None = None):
        super().__init__()
        inner = c_out if inner is None else inner
        self.conv1 = nn.Conv2d(c_in, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            if shortcut == "A":
                self.shortcut = _PadShortcut(c_in, c_out)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(
        self,
        depth: int = 20,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        shortcut: str = "A",
        inner: Sequence[int] | None = None,
    ):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n ≥ 1, got {depth}")
        shortcut = str(shortcut).upper()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if width < 1:
            raise ValueError("width must be ≥ 1")
        n = (depth - 2) // 6
        if inner is not None and (len(inner) != 3 * n or any(int(c) < 1 for c in inner)):
            raise ValueError(f"inner must list {3 * n} block widths ≥ 1 (one per block), got {list(inner)}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                width_i = None if inner is None else int(inner[len(blocks)])
                blocks.append(BasicBlock(c_in, c_out, stride, shortcut, width_i))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.blocks(x))
        return self.fc(x.flatten(1))


def resnet20(
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 16,
    shortcut: str = "A",
    inner: Sequence[int] | None = None,
) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016), ≈0.27M parameters at width 16."""
    return CifarResNet(20, in_channels, num_classes, width, shortcut, inner)


def resnet32(
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 16,
    shortcut: str = "A",
    inner: Sequence[int] | None = None,
) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016), ≈0.46M parameters at width 16."""
    return CifarResNet(32, in_channels, num_classes, width, shortcut, inner)


def resnet56(
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 16,
    shortcut: str = "A",
    inner: Sequence[int] | None = None,
) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016), ≈0.85M parameters at width 16."""
    return CifarResNet(56, in_channels, num_classes, width, shortcut, inner)
