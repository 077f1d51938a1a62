"""Sequential calibration: the model pruned group by group, each group's inputs taken from the pruned groups before.

Groups, in the order the forward pass first calls them: for a transformer, the selected layers inside one element
of its largest ``nn.ModuleList`` of same-type modules (``encoder.layer``, ``h``, ``layers``); every other
selected layer (a CNN's or MLP's, a classifier head) is a group of its own. For each group, forward pre-hooks on
its layers accumulate their input Hessians (:class:`core.engine.layerwise.hessian.Hessian`, a running mean: no
activation is kept) over one pass of the model over the calibration examples, in batches; then its layers are
pruned, and the next group's pass sees the pruned outputs. Memory besides the model: one batch's activations and
the Hessians (d_in × d_in) of one group's layers. Cost: one forward pass over the calibration examples per group.
The inputs are whatever the model takes (float features, images, int64 token ids): they are only passed through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from core.engine.buffers import map_large_allocations
from core.engine.layerwise.hessian import Hessian, input_columns
from core.engine.obs import Scope
from core.engine.patterns import Pattern, as_matrix

#: a layer solver: (weights (rows, cols), H, sparsity, pattern, pruned=…, **options) → (weights, prune-mask, loss)
Solver = Callable[..., tuple[Tensor, Tensor, float]]
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class LayerwiseConfig:
    damp: float = 0.01  # dampening, relative to the mean diagonal of H
    blocksize: int = 128  # SparseGPT's lazy column block
    batch: int = 16  # calibration examples per forward pass
    samples: int | None = None  # calibration examples (None: all given)
    seed: int = 0  # which examples, when fewer than given


@dataclass
class LayerStep:
    """One prune of the pruner's log: no loss model of the whole network (``predicted_loss_change`` is NaN, reported
    as null); the layers' OBS reconstruction losses instead."""

    sparsity: float
    predicted_loss_change: float = math.nan
    layer_losses: dict[str, float] = field(default_factory=dict)


def block_list(model: nn.Module) -> str | None:
    """The name of the largest ``nn.ModuleList`` (at least 2) of modules of one type, or None."""
    best, size = None, 1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > size and len({type(m) for m in mod}) == 1:
            best, size = name, len(mod)
    return best


class _Stop(Exception):
    """Ends a calibration pass early: the rest of the forward pass is not needed."""


def layer_groups(model: nn.Module, names: list[str], probe: Tensor) -> list[list[str]]:
    """The selected weights' layers (module names) in groups, ordered by their first call on ``probe``."""
    return _probe(model, names, probe)[0]


def _probe(model: nn.Module, names: list[str], probe: Tensor) -> tuple[list[list[str]], dict[str, int]]:
    """(the groups, how often the forward pass on ``probe`` calls each layer)."""
    modules = dict(model.named_modules())
    layers = []
    for n in names:
        mod_name = n[: -len(".weight")] if n.endswith(".weight") else None
        if n == "weight":
            mod_name = ""
        if mod_name is None or not isinstance(modules.get(mod_name), LAYERS):
            raise ValueError(f"layer-wise methods prune the weights of Linear and Conv layers; {n} is not one")
        layers.append(mod_name)
    order: dict[str, int] = {}
    calls: dict[str, int] = {}

    def seen(m: str) -> None:
        order.setdefault(m, len(order))
        calls[m] = calls.get(m, 0) + 1

    handles = [modules[m].register_forward_pre_hook(lambda mod, args, m=m: seen(m)) for m in layers]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    blocks = block_list(model)
    prefix = f"{blocks}." if blocks else None
    groups: dict[str, list[str]] = {}
    for m in sorted(layers, key=lambda m: order.get(m, len(order))):
        key = ".".join(m.split(".")[: len(prefix.split("."))]) if prefix and m.startswith(prefix) else m
        groups.setdefault(key, []).append(m)
    return list(groups.values()), calls


def _raise_stop() -> None:
    raise _Stop


@dataclass
class LayerwisePruner:
    """Prunes the named Linear/Conv weights of a model in place with a layer solver, group by group."""

    solver: Solver
    pattern: Pattern = field(default_factory=Pattern)
    config: LayerwiseConfig = field(default_factory=LayerwiseConfig)
    options: dict = field(default_factory=dict)  # the solver's own (SparseGPT: blocksize, damp; OBC: damp)
    log: list[LayerStep] = field(default_factory=list)
    scope: Scope = Scope.LAYER  # every layer to the target: the solvers are per layer

    def prune(
        self,
        model: nn.Module,
        names: list[str],
        sparsity: float,
        data: tuple[Tensor, Tensor] | Tensor,
        masks: dict[str, Tensor] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> dict[str, Tensor]:
        """Masks {name: 0/1 tensor}; uses the inputs x of ``data`` (labels, if given, are not read)."""
        if not 0.0 <= sparsity < 1.0:
            raise ValueError("sparsity must be in [0, 1)")
        map_large_allocations()  # freed tensors leave the process: its peak follows the live ones, as the plan counts
        x = data[0] if isinstance(data, (tuple, list)) else data
        cfg = self.config
        if cfg.samples is not None and cfg.samples < len(x):
            pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.samples]
            x = x[pick.sort().values.to(x.device)]
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        out = {}
        step = LayerStep(sparsity)
        was_training = model.training
        model.eval()
        try:
            groups, calls = _probe(model, names, x[:1])
            for gi, group in enumerate(groups):
                # the pass stops after the group's last layer when each of its layers is called once per pass
                last = modules[group[-1]] if all(calls.get(m) == 1 for m in group) else None
                hessians = self._calibrate(model, [modules[m] for m in group], x, last)
                for m, hs in zip(group, hessians, strict=True):
                    name = f"{m}.weight" if m else "weight"
                    old = masks.get(name) if masks else None
                    out[name], step.layer_losses[name] = self._prune_layer(params[name], modules[m], hs, sparsity, old)
                if progress:
                    progress((gi + 1) / len(groups))
        finally:
            model.train(was_training)
        self.log.append(step)
        return {n: out[n] for n in names}

    def _calibrate(
        self, model: nn.Module, layers: list[nn.Module], x: Tensor, last: nn.Module | None = None
    ) -> list[list[Hessian]]:
        """Every layer's input Hessians (one per conv group) over one pass of the model over ``x``, stopped once
        ``last`` has been called (the rest of the pass is not needed)."""
        hessians: list[list[Hessian]] = []
        for mod in layers:
            w = mod.weight
            d = math.prod(w.shape[1:])
            dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
            hessians.append([Hessian(d, dtype, w.device) for _ in range(getattr(mod, "groups", 1))])

        def hook(mod, args, hs) -> None:
            for h, cols in zip(hs, input_columns(mod, args[0].detach()), strict=True):
                h.add(cols)

        handles = [
            mod.register_forward_pre_hook(lambda mod, args, hs=hs: hook(mod, args, hs))
            for mod, hs in zip(layers, hessians, strict=True)
        ]
        if last is not None:
            handles.append(last.register_forward_hook(lambda mod, args, out: _raise_stop()))
        try:
            with torch.no_grad():
                for chunk in x.split(self.config.batch):
                    try:
                        model(chunk)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
        return hessians

    def _prune_layer(
        self, param: Tensor, mod: nn.Module, hessians: list[Hessian], sparsity: float, old: Tensor | None
    ) -> tuple[Tensor, float]:
        """Prune one layer's weight in place: (its keep-mask, its OBS loss)."""
        w = as_matrix(param.detach())
        pruned = as_matrix(old) == 0 if old is not None else None
        rows = w.shape[0] // len(hessians)
        new, prune, loss = torch.empty_like(w), torch.zeros_like(w, dtype=torch.bool), 0.0
        for g, h in enumerate(hessians):
            r = slice(g * rows, (g + 1) * rows)
            new[r], prune[r], part = self.solver(
                w[r], h.h, sparsity, self.pattern, pruned=pruned[r] if pruned is not None else None, **self.options
            )
            loss += part
        with torch.no_grad():
            param.copy_(new.reshape(param.shape))
        return (~prune).to(param.dtype).reshape(param.shape), loss
