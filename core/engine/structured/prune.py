"""The structured prune: each family in turn calibrated, scored, updated and physically shrunk.

Families go in module order; each one's consumer input Hessian is taken on the calibration inputs passed through the
model *as already shrunk* (so later layers see the pruned outputs, as in sequential layer-wise calibration). Every
family loses the same fraction of its units (rounded, at least one unit kept): a uniform width per kind, which a
Hugging Face config (one ``intermediate_size``) requires. ``saliency``: ``"obs"`` (OBS group saliency with the joint
update of the consumer's remaining columns; a consumer Linear's bias is an extra, never removed input column of
ones, so the update can move it too; a residual stream's units: summed over its consumers, each one updated),
``"fisher"`` (OBS group saliency on WoodFisher's blocks of the consumer's weights,
:mod:`core.engine.structured.fisher`, with the update of the consumer's remaining weights; the blocks come from the
caller, estimated on the model as shrunk so far; one consumer per family) or ``"l2"`` (the groups' L2 norm over all
their weights, no update). ``counts`` replaces the uniform fraction by a number of units per family (global
allocation, :mod:`core.engine.structured.allocation`, ranks the units of all families by :func:`removal_curves`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.engine.buffers import map_large_allocations
from core.engine.layerwise.hessian import Hessian, input_columns
from core.engine.structured.fisher import prune_consumer
from core.engine.structured.groups import Family
from core.engine.structured.saliency import column_groups, l2_groups, obs_groups, obs_groups_coupled
from core.engine.structured.shrink import shrink

__all__ = ["SALIENCIES", "FamilyResult", "FisherBlocks", "prune_structured", "removal_curves", "units_to_remove"]

SALIENCIES = ("obs", "fisher", "l2")
#: F⁻¹ of a consumer's weights (the model as shrunk so far, the weight's full name) as explicit (nb, c, c) float64
#: blocks: :func:`core.engine.structured.fisher.consumer_inverse` with the run's estimator
FisherBlocks = Callable[[nn.Module, str], Tensor]


@dataclass
class FamilyResult:
    name: str
    kind: str
    units: int
    kept: int
    removed: list[int]  # unit indices, in the order chosen
    loss: float | None  # OBS: the summed saliency of the removals (½·ΔW H ΔWᵀ, summed over consumers); l2: None


def units_to_remove(units: int, fraction: float) -> int:
    """round(fraction × units), keeping at least one unit."""
    return min(units - 1, max(0, round(fraction * units)))


def _hessians(model: nn.Module, consumers: list[nn.Module], x: Tensor, batch: int) -> list[Tensor]:
    """Every consumer's input Hessian from one calibration pass (a Linear's bias as an extra column of ones)."""
    accs: list[Hessian | None] = [None] * len(consumers)

    def hook_for(k: int, consumer: nn.Module):
        bias = isinstance(consumer, nn.Linear) and consumer.bias is not None

        def hook(_mod, args):
            (rows,) = input_columns(consumer, args[0].detach())
            rows = rows.to(torch.float64)
            if bias:
                rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype, device=rows.device)], 1)
            if accs[k] is None:
                accs[k] = Hessian(rows.shape[1], torch.float64, rows.device)
            accs[k].add(rows)

        return hook

    handles = [c.register_forward_pre_hook(hook_for(k, c)) for k, c in enumerate(consumers)]
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(x[i : i + batch])
    finally:
        for handle in handles:
            handle.remove()
    for c, acc in zip(consumers, accs, strict=True):
        if acc is None:
            raise ValueError(f"the calibration pass never reached {type(c).__name__} layer")
    return [acc.h for acc in accs]


def _obs_coupled(
    model: nn.Module, fam: Family, x: Tensor, remove: int, damp: float, batch: int
) -> tuple[list[int], float]:
    """OBS over every consumer of ``fam`` (a residual stream): the units removed and the summed saliency; each
    consumer's remaining columns (and a Linear's bias) updated in place."""
    consumers = [model.get_submodule(c) for c in fam.consumers]
    hs = _hessians(model, consumers, x, batch)
    ws, groups, biases = [], [], []
    for c in consumers:
        bias = isinstance(c, nn.Linear) and c.bias is not None
        w = c.weight.detach().flatten(1)
        ws.append(torch.cat([w, c.bias.detach()[:, None]], 1) if bias else w)
        groups.append(column_groups(fam.units, ws[-1].shape[1], skip_last=int(bias)))
        biases.append(bias)
    news, removed, losses = obs_groups_coupled(ws, hs, groups, remove, damp=damp)
    with torch.no_grad():
        for c, new, bias in zip(consumers, news, biases, strict=True):
            new = new.to(c.weight.dtype)
            if bias:
                c.bias.copy_(new[:, -1])
                new = new[:, :-1]
            c.weight.copy_(new.reshape(c.weight.shape))
    return removed, sum(losses)


def _l2_norms(model: nn.Module, family: Family) -> Tensor:
    params = dict(model.named_parameters())
    total = torch.zeros(family.units, dtype=torch.float64)
    for s in family.slices:
        if s.name in params:
            t = params[s.name].detach().to(torch.float64).movedim(s.dim, 0)
            total += t.reshape(family.units, -1).pow(2).sum(1).cpu()
    return total


def _check_saliency(saliency: str, fisher: FisherBlocks | None) -> None:
    if saliency not in SALIENCIES:
        raise ValueError(f"unknown saliency {saliency!r}; expected one of {', '.join(SALIENCIES)}")
    if saliency == "fisher" and fisher is None:
        raise ValueError("saliency 'fisher' needs the consumers' Fisher blocks (fisher=)")


def prune_structured(
    model: nn.Module,
    families: list[Family],
    fraction: float,
    calibration: Tensor | None,
    *,
    saliency: str = "obs",
    damp: float = 0.01,
    batch: int = 16,
    progress: Callable[[float], None] | None = None,
    fisher: FisherBlocks | None = None,
    counts: list[int] | None = None,
) -> list[FamilyResult]:
    """Remove ``fraction`` of the units of every family of ``model`` (in place, physically), or ``counts[i]`` units of
    family i; ``calibration`` inputs (whatever the model takes) are needed for ``"obs"``, ``fisher`` for
    ``"fisher"``."""
    _check_saliency(saliency, fisher)
    map_large_allocations()  # freed tensors leave the process: its peak follows the live ones, as the plan counts
    if counts is not None and (
        len(counts) != len(families) or any(not 0 <= k < f.units for k, f in zip(counts, families))
    ):
        raise ValueError("counts: one per family, each in [0, units − 1]")
    results = []
    was_training = model.training
    model.eval()
    try:
        for i, fam in enumerate(families):
            remove = units_to_remove(fam.units, fraction) if counts is None else counts[i]
            loss = None
            if saliency == "l2":
                removed = l2_groups(_l2_norms(model, fam), remove)
            elif saliency == "fisher":
                if fam.more_consumers:
                    raise ValueError(f"{fam.name} has {len(fam.consumers)} consumers; Fisher group saliency takes one")
                consumer = model.get_submodule(fam.consumer)
                finv = fisher(model, fam.consumer + ".weight")
                new, removed, losses = prune_consumer(consumer.weight, fam.units, finv, remove)
                loss = sum(losses)
                with torch.no_grad():
                    consumer.weight.copy_(new)
            elif fam.more_consumers:
                removed, loss = _obs_coupled(model, fam, calibration, remove, damp, batch)
            else:
                consumer = model.get_submodule(fam.consumer)
                bias = isinstance(consumer, nn.Linear) and consumer.bias is not None
                (h,) = _hessians(model, [consumer], calibration, batch)
                w = consumer.weight.detach().flatten(1)
                if bias:
                    w = torch.cat([w, consumer.bias.detach()[:, None]], 1)
                groups = column_groups(fam.units, w.shape[1], skip_last=int(bias))
                new, removed, losses = obs_groups(w, h, groups, remove, damp=damp)
                loss = sum(losses)
                with torch.no_grad():
                    new = new.to(consumer.weight.dtype)
                    if bias:
                        consumer.bias.copy_(new[:, -1])
                        new = new[:, :-1]
                    consumer.weight.copy_(new.reshape(consumer.weight.shape))
            keep = torch.tensor(sorted(set(range(fam.units)) - set(removed)), dtype=torch.long)
            shrink(model, fam, keep)
            results.append(FamilyResult(fam.name, fam.kind, fam.units, len(keep), removed, loss))
            if progress:
                progress((i + 1) / len(families))
    finally:
        model.train(was_training)
    return results


def removal_curves(
    model: nn.Module,
    families: list[Family],
    calibration: Tensor | None,
    *,
    saliency: str = "obs",
    damp: float = 0.01,
    batch: int = 16,
    fisher: FisherBlocks | None = None,
) -> list[list[float]]:
    """Per family, the comparable cost of each of its greedy removals in turn (all but one unit), scored on ``model``
    as it is (nothing is changed): for global allocation across families.

    * ``"fisher"``: the Fisher saliency itself, a predicted increase of the training loss (½·δwᵀFδw), in the same
      units for every layer;
    * ``"obs"``: the saliency ½·ΔW H ΔWᵀ (the increase of the consumer's output squared error, ‖ΔW X‖²/n) over the
      consumer's output energy ½·tr(W H Wᵀ) = ‖W X‖²/n: the relative output error each removal adds;
    * ``"l2"``: each unit's squared norm over the family's mean squared unit norm, ascending."""
    _check_saliency(saliency, fisher)
    out = []
    was_training = model.training
    model.eval()
    try:
        for fam in families:
            if saliency == "l2":
                norms = _l2_norms(model, fam)
                out.append((norms.sort().values[: fam.units - 1] / norms.mean().clamp_min(1e-300)).tolist())
                continue
            if saliency == "obs" and fam.more_consumers:  # summed over the consumers, over their summed energy
                out.append(_coupled_curve(model, fam, calibration, damp, batch))
                continue
            consumer = model.get_submodule(fam.consumer)
            if saliency == "fisher":
                out.append(
                    prune_consumer(consumer.weight, fam.units, fisher(model, fam.consumer + ".weight"), fam.units - 1)[
                        2
                    ]
                )
                continue
            bias = isinstance(consumer, nn.Linear) and consumer.bias is not None
            (h,) = _hessians(model, [consumer], calibration, batch)
            w = consumer.weight.detach().flatten(1).to(torch.float64)
            if bias:
                w = torch.cat([w, consumer.bias.detach().to(torch.float64)[:, None]], 1)
            energy = 0.5 * float(((w @ h) * w).sum())
            groups = column_groups(fam.units, w.shape[1], skip_last=int(bias))
            losses = obs_groups(w, h, groups, fam.units - 1, damp=damp)[2]
            out.append([loss / energy if energy > 0 else loss for loss in losses])
    finally:
        model.train(was_training)
    return out


def _coupled_curve(model: nn.Module, fam: Family, x: Tensor, damp: float, batch: int) -> list[float]:
    """:func:`removal_curves`' ``"obs"`` score of a family with several consumers (a residual stream): each greedy
    removal's saliency summed over the consumers, over their summed output energy."""
    consumers = [model.get_submodule(c) for c in fam.consumers]
    hs = _hessians(model, consumers, x, batch)
    ws, groups = [], []
    for c in consumers:
        w = c.weight.detach().flatten(1).to(torch.float64)
        bias = isinstance(c, nn.Linear) and c.bias is not None
        ws.append(torch.cat([w, c.bias.detach().to(torch.float64)[:, None]], 1) if bias else w)
        groups.append(column_groups(fam.units, ws[-1].shape[1], skip_last=int(bias)))
    energy = sum(0.5 * float(((w @ h) * w).sum()) for w, h in zip(ws, hs, strict=True))
    losses = obs_groups_coupled(ws, hs, groups, fam.units - 1, damp=damp)[2]
    return [loss / energy if energy > 0 else loss for loss in losses]
