"""CIFAR ResNets of He et al. 2016 (§4.2): depth 6n+2, three stages of n basic blocks.

Stage widths are ``width``, 2·``width``, 4·``width`` (16/32/64 in the paper; ResNet-20 then has
≈0.27M parameters). Where a block halves the resolution and doubles the width the shortcut is
either option **A** (the paper's CIFAR choice: stride-2 subsampling and zero-padding of the new
channels, no parameters) or option **B** (a 1×1 convolution + BN projection).

``inner`` gives each block's inner width (``conv1``'s output channels, ``conv2``'s input channels; default: the
stage width): what structured channel pruning shrinks (:mod:`core.engine.structured`), so that the smaller model is
this constructor with ``inner`` and loads its ``pruned.safetensors`` as is. ``widths`` gives the three stage widths
(default ``width``, 2·``width``, 4·``width``) and, with option A, ``shortcut_index`` the channel map of each of the two
downsampling shortcuts (stage s−1's channel j → its channel in stage s, or −1: dropped; default: the zero-padding
j → (c_s − c_{s−1}) // 2 + j): what pruning the residual stream's channels changes. JSON lists, so they go into a
report's ``structure.arch_kwargs``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _PadShortcut(nn.Module):
    """Option A: ``x[:, :, ::2, ::2]`` with input channel j copied to output channel ``index[j]`` (−1: dropped) and
    the other output channels zero. Default: the paper's zero-padding, j → (c_out − c_in) // 2 + j. Held as
    ``source`` (output channel → the input channel it copies, −1 for a zero; a non-persistent buffer, so the state
    dict is the parameter-free one): structured pruning slices and renumbers it (:mod:`core.engine.structured`)."""

    def __init__(self, c_in: int, c_out: int, index: Sequence[int] | None = None):
        super().__init__()
        before = (c_out - c_in) // 2
        index = [before + j for j in range(c_in)] if index is None else [int(i) for i in index]
        if len(index) != c_in or any(not -1 <= i < c_out for i in index):
            raise ValueError(f"a shortcut index maps {c_in} channels into [0, {c_out}) or -1, got {index}")
        taken = [i for i in index if i >= 0]
        if len(set(taken)) != len(taken):
            raise ValueError(f"a shortcut index maps two channels onto one: {index}")
        source = torch.full((c_out,), -1, dtype=torch.long)
        for j, i in enumerate(index):
            if 0 <= i < c_out:
                source[i] = j
        self.register_buffer("source", source, persistent=False)

    def index(self, c_in: int) -> list[int]:
        """The constructor's ``index`` for ``c_in`` input channels: input channel j → its output channel, or −1."""
        out = [-1] * c_in
        for i, j in enumerate(self.source.tolist()):
            if j >= 0:
                out[j] = i
        return out

    def forward(self, x: Tensor) -> Tensor:
        # one zero channel appended; source −1 picks it
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 1))[:, self.source]


class BasicBlock(nn.Module):
    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        shortcut: str,
        inner: int | None = None,
        shortcut_index: Sequence[int] | None = None,
    ):
        super().__init__()
        inner = c_out if inner is None else inner
        self.conv1 = nn.Conv2d(c_in, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            if shortcut == "A":
                self.shortcut = _PadShortcut(c_in, c_out, shortcut_index)
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
        widths: Sequence[int] | None = None,
        shortcut_index: Sequence[Sequence[int]] | None = None,
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
        widths = [width, 2 * width, 4 * width] if widths is None else [int(c) for c in widths]
        if len(widths) != 3 or any(c < 1 for c in widths):
            raise ValueError(f"widths must list 3 stage widths ≥ 1, got {widths}")
        if shortcut_index is not None and (shortcut != "A" or len(shortcut_index) != 2):
            raise ValueError("shortcut_index lists 2 channel maps (one per downsampling block), for shortcut 'A' only")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                width_i = None if inner is None else int(inner[len(blocks)])
                index = shortcut_index[stage - 1] if shortcut_index is not None and stride == 2 else None
                blocks.append(BasicBlock(c_in, c_out, stride, shortcut, width_i, index))
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
    widths: Sequence[int] | None = None,
    shortcut_index: Sequence[Sequence[int]] | None = None,
) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016), ≈0.27M parameters at width 16."""
    return CifarResNet(20, in_channels, num_classes, width, shortcut, inner, widths, shortcut_index)


def resnet32(
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 16,
    shortcut: str = "A",
    inner: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
    shortcut_index: Sequence[Sequence[int]] | None = None,
) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016), ≈0.46M parameters at width 16."""
    return CifarResNet(32, in_channels, num_classes, width, shortcut, inner, widths, shortcut_index)


def resnet56(
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 16,
    shortcut: str = "A",
    inner: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
    shortcut_index: Sequence[Sequence[int]] | None = None,
) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016), ≈0.85M parameters at width 16."""
    return CifarResNet(56, in_channels, num_classes, width, shortcut, inner, widths, shortcut_index)


def cifar_arch_kwargs(model: CifarResNet) -> dict:
    """The constructor arguments that structured pruning changes, read from a (shrunk) model: ``inner``,
    ``widths`` and, with zero-padding shortcuts, ``shortcut_index``."""
    blocks = list(model.blocks)
    out: dict = {
        "inner": [b.conv1.out_channels for b in blocks],
        "widths": [model.conv1.out_channels]
        + [b.conv2.out_channels for b in blocks if isinstance(b.shortcut, _PadShortcut | nn.Sequential)],
    }
    pads = [b for b in blocks if isinstance(b.shortcut, _PadShortcut)]
    if pads:
        out["shortcut_index"] = [b.shortcut.index(b.conv1.in_channels) for b in pads]
    return out
