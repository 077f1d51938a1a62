"""The residual stream's channels as families: a ResNet stage's width, pruned as one coupled group.

Between two width changes every residual sum adds the same channels, so channel c of a stage is one unit across
every tensor that writes or reads it. A stream family's slices are its **producers'** rows (the stem's conv + BN for
the first stage, every block's last conv + BN, a projection shortcut's 1×1 conv + BN where the stage starts) and its
**consumers'** input columns (every block's first conv reading the stage, the next stage's first block's conv1 and
projection shortcut, and finally the classifier); each consumer's input Hessian scores the units
(:func:`core.engine.structured.saliency.obs_groups_coupled`). This module finds the layout (:class:`Stage`);
:func:`core.engine.structured.groups.find_families` turns each stage into a family named ``stream.<i>``.

A parameter-free (option A, zero-padding) shortcut where a stage starts is an index map held in a ``source`` buffer
(output channel → the input channel it copies, −1 for a zero): the new stage slices it by its kept channels, and the
stage before it renumbers its values (:func:`core.engine.structured.shrink.shrink`).

The model is read by its attribute names (the zoo's CIFAR ResNets and the torchvision-style ResNets): ``conv1`` +
``bn1`` (the stem), the blocks (``blocks``, or ``layer1`` … ``layer4``), each with ``conv1`` and its last conv + BN
(``conv3``/``bn3`` in a bottleneck, else ``conv2``/``bn2``), a shortcut (``shortcut`` or ``downsample``: absent or
identity, a Conv2d + BatchNorm2d projection, or a module with a ``source`` buffer), and ``fc``. A model that does
not match has no stream families.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["Stage", "stream_stages"]


@dataclass
class Stage:
    """One width of the residual stream: the modules that write it (their rows, and a BatchNorm's statistics), the
    index buffers sliced by it (a zero-pad shortcut's ``source``, its output channels), the modules that read it
    (their input columns) and the index buffers whose values are its channels (the next zero-pad shortcut's)."""

    width: int
    producers: list[str] = field(default_factory=list)
    sliced: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    renumber: list[str] = field(default_factory=list)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if isinstance(getattr(model, "blocks", None), nn.Sequential):
        return [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    stages = [getattr(model, f"layer{k}", None) for k in range(1, 5)]
    if all(isinstance(s, nn.Sequential) for s in stages):
        return [(f"layer{k + 1}.{i}", b) for k, s in enumerate(stages) for i, b in enumerate(s)]
    return []


def _conv_bn(block: nn.Module, prefix: str, k: int) -> tuple[nn.Conv2d, list[str]] | None:
    conv, bn = getattr(block, f"conv{k}", None), getattr(block, f"bn{k}", None)
    if not (isinstance(conv, nn.Conv2d) and conv.groups == 1 and isinstance(bn, nn.BatchNorm2d)):
        return None
    return conv, [_join(prefix, f"conv{k}"), _join(prefix, f"bn{k}")]


def _shortcut(block: nn.Module, prefix: str) -> tuple[str, str, nn.Module | None]:
    """(kind: identity | projection | index | unknown, its module's name, the module)."""
    for attr in ("shortcut", "downsample"):
        if hasattr(block, attr):
            mod, name = getattr(block, attr), _join(prefix, attr)
            break
    else:
        return "identity", "", None
    if mod is None or isinstance(mod, nn.Identity):
        return "identity", name, None
    if isinstance(mod, nn.Sequential) and len(mod) == 2:
        conv, bn = mod[0], mod[1]
        if isinstance(conv, nn.Conv2d) and conv.groups == 1 and isinstance(bn, nn.BatchNorm2d):
            return "projection", name, mod
    if "source" in dict(mod.named_buffers(recurse=False)):
        return "index", name, mod
    return "unknown", name, None


def stream_stages(model: nn.Module) -> list[Stage]:
    """Every width of the residual stream (a CIFAR ResNet's 3 stages; a torchvision ResNet's stages, its stem a
    stage of its own where the first block projects), in forward order; [] for a model that is not a ResNet of that
    layout."""
    stem = _conv_bn(model, "", 1)
    fc = getattr(model, "fc", None)
    blocks = _blocks(model)
    if stem is None or not isinstance(fc, nn.Linear) or not blocks:
        return []
    stages = [Stage(stem[0].out_channels, list(stem[1]))]
    for prefix, block in blocks:
        first = getattr(block, "conv1", None)
        last = _conv_bn(block, prefix, 3 if hasattr(block, "conv3") else 2)
        kind, sc_name, sc = _shortcut(block, prefix)
        if not isinstance(first, nn.Conv2d) or first.groups != 1 or last is None or kind == "unknown":
            return []
        stage = stages[-1]
        if first.in_channels != stage.width:
            return []
        stage.consumers.append(_join(prefix, "conv1"))
        if kind == "identity":
            if last[0].out_channels != stage.width:
                return []
            stage.producers += last[1]
            continue
        new = Stage(last[0].out_channels, list(last[1]))
        if kind == "projection":
            if sc[0].in_channels != stage.width or sc[0].out_channels != new.width:
                return []
            stage.consumers.append(_join(sc_name, "0"))
            new.producers += [_join(sc_name, "0"), _join(sc_name, "1")]
        else:
            if len(sc.source) != new.width:
                return []
            stage.renumber.append(_join(sc_name, "source"))
            new.sliced.append(_join(sc_name, "source"))
        stages.append(new)
    if fc.in_features != stages[-1].width:
        return []
    stages[-1].consumers.append("fc")
    return stages
