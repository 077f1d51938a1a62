"""Slicing modules down to the kept units: new, smaller tensors and the module attributes that state their sizes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.engine.structured.groups import Family

__all__ = ["shrink", "unit_index"]


def unit_index(keep: Tensor, units: int, size: int) -> Tensor:
    """The indices along a dimension of ``size`` (``units`` equal slices) that the kept units own."""
    per = size // units
    return (keep[:, None] * per + torch.arange(per)).flatten()


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _resize(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Conv2d):
        module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
    elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        module.num_features = (module.weight if module.weight is not None else module.running_mean).shape[0]


def shrink(model: nn.Module, family: Family, keep: Tensor) -> None:
    """Keep only units ``keep`` (sorted indices) of ``family`` in ``model``, in place: every slice of the family is
    replaced by a smaller tensor (a parameter stays a parameter), and Linear/Conv2d/BatchNorm sizes follow; the
    index buffers of ``family.renumber`` (values: unit indices) are renumbered to the kept units' positions."""
    keep = keep.to(torch.long).sort().values
    touched = {}
    for s in family.slices:
        module, attr = _owner(model, s.name)
        old = getattr(module, attr)
        idx = unit_index(keep, family.units, old.shape[s.dim]).to(old.device)
        new = old.detach().index_select(s.dim, idx).clone()
        if isinstance(old, nn.Parameter):
            module._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = new
        touched[id(module)] = module
    for name in family.renumber:  # unit indices held as values: kept units move to their new positions, others −1
        module, attr = _owner(model, name)
        old = getattr(module, attr)
        position = torch.full((family.units,), -1, dtype=old.dtype, device=old.device)
        position[keep.to(old.device)] = torch.arange(len(keep), dtype=old.dtype, device=old.device)
        module._buffers[attr] = torch.where(old >= 0, position[old.clamp(min=0)], -1)
    for module in touched.values():
        _resize(module)
    bert = f"{family.name}.attention.self" if family.name else "attention.self"
    if family.kind == "heads" and _has(model, bert):  # BERT-style: num_attention_heads, all_head_size
        attn = model.get_submodule(bert)  # (Llama-style attention infers its head counts from the widths)
        head = attn.all_head_size // attn.num_attention_heads if hasattr(attn, "all_head_size") else None
        attn.num_attention_heads = len(keep)
        if head is not None:
            attn.all_head_size = head * len(keep)
