"""ImageNet ResNet-18 / ResNet-50 (He et al. 2016), torchvision-compatible layout, no torchvision.

Projection (option B) shortcuts; ResNet-50 strides in its 3×3 conv ("v1.5"). ``small_input``
swaps the 7×7/2 stem + max-pool for a 3×3/1 stem without pooling, the usual adaptation to
32×32 inputs, which would otherwise be reduced to 1×1 before the last stage. ``inner`` lists the blocks' inner widths
in order (structured channel pruning's output, :mod:`core.engine.structured`): one per basic block (``conv1``'s
output channels), two per bottleneck (``conv1``'s and ``conv2``'s); default: the paper's. ``widths`` lists the
residual stream's widths: the stem's, then each stage's output (default 64, 64·e, 128·e, 256·e, 512·e with the
block's expansion e; for basic blocks the stem's equals the first stage's, or that stage's first block projects).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, inner: Sequence[int] = (), c_out: int | None = None):
        super().__init__()
        (w1,) = inner or (planes,)
        planes = planes if c_out is None else c_out
        self.conv1 = nn.Conv2d(c_in, w1, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(c_in, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, inner: Sequence[int] = (), c_out: int | None = None):
        super().__init__()
        c_out = planes * self.expansion if c_out is None else c_out
        w1, w2 = inner or (planes, planes)
        self.conv1 = nn.Conv2d(c_in, w1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = nn.Conv2d(w2, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = _downsample(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        in_channels: int = 3,
        num_classes: int = 1000,
        small_input: bool = False,
        inner: Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
    ):
        super().__init__()
        per = 2 if block is Bottleneck else 1
        stream = [64] + [p * block.expansion for p in (64, 128, 256, 512)] if widths is None else list(widths)
        if len(stream) != 5 or any(int(c) < 1 for c in stream):
            raise ValueError(f"widths must list 5 widths ≥ 1 (the stem's, then each stage's), got {list(stream)}")
        stream = [int(c) for c in stream]
        if inner is not None and (len(inner) != per * sum(layers) or any(int(c) < 1 for c in inner)):
            raise ValueError(f"inner must list {per * sum(layers)} widths ≥ 1 ({per} per block), got {list(inner)}")
        inner_widths = [int(c) for c in inner] if inner is not None else []
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, stream[0], 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, stream[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(stream[0])
        c_in = stream[0]
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                k = per * (sum(layers[:i]) + j)
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(c_in, planes, stride, inner_widths[k : k + per], stream[i + 1]))
                c_in = stream[i + 1]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(
    in_channels: int = 3,
    num_classes: int = 1000,
    small_input: bool = False,
    inner: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
) -> ResNet:
    """ResNet-18 (basic blocks, ≈11.7M parameters at 1000 classes)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], in_channels, num_classes, small_input, inner, widths)


def resnet50(
    in_channels: int = 3,
    num_classes: int = 1000,
    small_input: bool = False,
    inner: Sequence[int] | None = None,
    widths: Sequence[int] | None = None,
) -> ResNet:
    """ResNet-50 (bottleneck blocks, ≈25.6M parameters at 1000 classes)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], in_channels, num_classes, small_input, inner, widths)
