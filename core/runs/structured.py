"""A structured run: whole units removed and the model physically shrunk (:mod:`core.engine.structured`).

``spec.structure`` names the units (``neurons``, ``channels``, ``heads``) and ``spec.sparsity`` the fraction of each
family's units removed (the same in every family). The method's ``group_saliency`` (:mod:`core.engine.methods`)
scores them: OBS group saliency on the layer-wise input Hessian of ``fisher.samples`` calibration examples (with
``layerwise.damp`` and ``layerwise.batch_size``) with the joint update of the remaining weights; for woodfisher,
OBS group saliency on the empirical Fisher blocks of each consumer's weights (``fisher.*``: samples, λ and its
relative default; the blocks by :mod:`core.runs.structured_plan`) with the update; or the L2 norm.
``spec.structure_allocation`` 'global' removes the fraction of all units instead, the cheapest by a comparable
score over all families (:mod:`core.engine.structured.allocation`), scored once on the dense model; zoo models only.
Then ``finetune.epochs`` of plain (unmasked) training of the smaller model. The outputs load with no masks and no
custom code:

* ``pruned.safetensors``: the smaller model's state dict (new shapes, the model's own names);
* zoo models: the constructor arguments that build it (``report.structure.arch_kwargs``, merged over the upload's:
  ``hidden`` for ``mlp``, ``inner`` and ``widths`` for the ResNets (and ``shortcut_index`` for the CIFAR ones'
  zero-padding shortcuts), ``channels`` and ``fc`` for ``lenet5``), and ``model.onnx``;
* Hugging Face models: ``hf_model.zip`` with ``config.json``'s ``intermediate_size`` updated, or for heads its
  ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` (``from_pretrained`` as is). Heads are taken
  from Llama-style models only (:data:`HEADS_MODEL_TYPES`, whose config states ``head_dim``: whole key/value groups,
  :mod:`core.engine.structured.groups`); other models are refused: transformers 5 sizes their head as
  ``hidden_size / num_attention_heads`` and has no ``pruned_heads`` any more, so fewer heads cannot be stated in
  their config.

A structured run checkpoints after the prune and after every fine-tuning epoch: the smaller model's weights, the units
each family kept (a resumed attempt shrinks the freshly loaded dense model the same way before loading them), the
optimizer, the curve and the dense model's measurements. A resumed run ends with the same weights as an uninterrupted
one (every random draw is keyed by seed and epoch).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from core.engine.layout import select_parameters
from core.engine.methods import method_info
from core.engine.structured.allocation import allocate
from core.engine.structured.fisher import consumer_inverse
from core.engine.structured.groups import KINDS, Family, find_families, head_config
from core.engine.structured.prune import FamilyResult, prune_structured, removal_curves, units_to_remove
from core.engine.structured.shrink import shrink
from core.errors import Canceled, InvalidInput
from core.io.data import Dataset
from core.io.files import atomic_write
from core.io.model_files import save_state_dict
from core.io.zoo.lenet import LeNet5
from core.io.zoo.mlp import MLP
from core.io.zoo.resnet import Bottleneck, ResNet
from core.io.zoo.resnet_cifar import CifarResNet, cifar_arch_kwargs
from core.runs.checkpoint import optimizer_state, restore_optimizer
from core.runs.numerics import TRAIN_HINT, check_metrics, check_weights, json_bytes, json_safe
from core.runs.phases import PeakMemory, PhaseTimer
from core.runs.report import count_macs, curve_csv, curve_png, plot_title
from core.runs.sizes import dense_safetensors_bytes
from core.runs.spec import PruneSpec
from core.runs.speed import ORT_CPU, LatencyConfig, default_latency, measure, runtimes_for, speed_report
from core.runs.structured_plan import structured_fisher_plan
from core.runs.train import evaluate, learning_rate, make_optimizer, train_epoch

__all__ = [
    "HEADS_MODEL_TYPES",
    "check_structure",
    "execute_structured",
    "hf_global_error",
    "hf_heads_error",
    "shrunk_config",
    "structured_plan",
]

#: Hugging Face model types whose heads can be pruned: Llama-style decoders, whose config states ``head_dim``
HEADS_MODEL_TYPES = ("llama", "mistral", "qwen2")

_HINT = "lower the sparsity or raise layerwise.damp"
#: what global allocation ranks units by, per group saliency (core.engine.structured.prune.removal_curves)
ALLOCATION_SCORES = {
    "fisher": "Fisher group saliency ½·δwᵀFδw: the predicted increase of the training loss",
    "obs": "OBS group saliency over the consumer's output energy: the relative increase of its output error",
    "l2": "squared group norm over the family's mean",
}


def _is_hf(model: nn.Module) -> bool:
    return callable(getattr(model, "export_artifacts", None))


def hf_heads_error(model_type: str | None = None) -> InvalidInput:
    """The 422 for ``structure: heads`` on a Hugging Face model that is not Llama-style."""
    takes = ", ".join(HEADS_MODEL_TYPES)
    return InvalidInput(
        f"structure 'heads' is supported for Llama-style Hugging Face models only (model_type {takes}: their "
        "config states head_dim, so a model with fewer heads loads from it); "
        + (f"this {model_type!r} model" if model_type else "this model")
        + "'s config sizes a head as hidden_size / num_attention_heads, and transformers 5 no longer reads "
        "pruned_heads, so with fewer heads it would not load; use structure 'neurons' (FFN units)",
        errors=[{"loc": ["spec", "structure"], "msg": f"heads: only for model_type {takes}", "type": "value_error"}],
    )


def _hf_model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "source", None), "model_type", None) or None


def hf_global_error() -> InvalidInput:
    return InvalidInput(
        "structure_allocation 'global' cannot be exported for a Hugging Face model: its config holds one "
        "intermediate_size (one width for every layer); use structure_allocation 'uniform'",
        errors=[
            {
                "loc": ["spec", "structure_allocation"],
                "msg": "global: not for Hugging Face models",
                "type": "value_error",
            }
        ],
    )


def check_structure(model: nn.Module, spec: PruneSpec) -> list[Family]:
    """The families ``spec.structure`` prunes in ``model``; :class:`InvalidInput` (422) naming what it supports."""
    if spec.structure == "heads" and _is_hf(model) and _hf_model_type(model) not in HEADS_MODEL_TYPES:
        raise hf_heads_error(_hf_model_type(model))
    if spec.structure_allocation == "global" and _is_hf(model):
        raise hf_global_error()
    families = find_families(model, spec.structure)
    if not families:
        able = [k for k in KINDS if find_families(model, k)]
        raise InvalidInput(
            f"the model has no {spec.structure} to prune structurally; it supports: "
            + (", ".join(able) if able else "none (only 'unstructured')")
            + (" (heads: transformers 5 cannot load fewer heads from a config)" if spec.structure == "heads" else ""),
            errors=[{"loc": ["spec", "structure"], "msg": f"supported: {able}", "type": "value_error"}],
        )
    selected = set(select_parameters(model, spec.layers.include, spec.layers.exclude))
    chosen = [f for f in families if f.slices[0].name in selected]  # by the producer's weight
    if not chosen or (_is_hf(model) and len(chosen) != len(families)):
        raise InvalidInput(
            f"layers.include/exclude select {len(chosen)} of the model's {len(families)} {spec.structure} families "
            f"(by their producing layer's weight: {', '.join(f.slices[0].name for f in families[:4])}, …)"
            + ("; a Hugging Face config holds one width, so every layer's are pruned" if _is_hf(model) else ""),
            errors=[
                {"loc": ["spec", "layers"], "msg": "selects no family (or, for HF, not all)", "type": "value_error"}
            ],
        )
    if spec.structure == "heads" and not any(units_to_remove(f.units, spec.sparsity) for f in chosen):
        _no_head_removed(chosen, spec.sparsity)
    coupled = [f for f in chosen if f.more_consumers]
    if coupled and method_info(spec.method).group_saliency == "fisher":
        producers = [f.slices[0].name for f in coupled]
        raise InvalidInput(
            f"{spec.method.value} scores a unit on the Fisher blocks of the one layer that reads it; a residual "
            f"stream's widths ({', '.join(f.name for f in coupled)}) are read by several layers: use method obc or "
            f"sparsegpt (OBS on the layer-wise Hessians, summed over the readers), or leave the stage widths out with "
            f"layers.exclude {producers}",
            errors=[
                {
                    "loc": ["spec", "method"],
                    "msg": "Fisher group saliency: one consumer per unit",
                    "type": "value_error",
                }
            ],
        )
    return chosen


def _no_head_removed(families: list[Family], sparsity: float) -> None:
    """422: the sparsity rounds to no whole head group in any layer (with one key/value head, multi-query attention,
    no group can go: a layer keeps at least one)."""
    units = min(f.units for f in families)
    why = (
        "each layer has a single key/value head (multi-query attention): its heads form one group, which stays"
        if units == 1
        else f"{sparsity:g} of {units} key/value groups rounds to none; raise the sparsity above {0.5 / units:g}"
    )
    raise InvalidInput(
        f"structure 'heads' removes whole key/value groups (a key/value head and its query heads); {why}",
        errors=[{"loc": ["spec", "sparsity"], "msg": "removes no head group", "type": "value_error"}],
    )


def structured_plan(model: nn.Module, spec: PruneSpec, families: list[Family], server_mb: float | None = None):
    """The memory plan of a structured woodfisher prune (:mod:`core.runs.structured_plan`; ``None`` for the other
    saliencies, whose layer-wise Hessians are one family's at a time), and each consumer weight's plan."""
    if method_info(spec.method).group_saliency != "fisher":
        return None, {}
    params = dict(model.named_parameters())
    consumers = {f"{f.consumer}.weight": tuple(params[f"{f.consumer}.weight"].shape) for f in families}
    units = {f"{f.consumer}.weight": f.units for f in families}
    return structured_fisher_plan(spec, consumers, units, server_mb)


def _fisher_blocks(spec: PruneSpec, plans: dict, x: Tensor, y: Tensor, dtype: torch.dtype, lambdas: dict):
    """The consumers' Fisher blocks (:data:`core.engine.structured.prune.FisherBlocks`) by the method's estimator,
    each with its plan's block size, path and chunk; ``lambdas`` collects the effective λ of each."""
    info = method_info(spec.method)

    def blocks(model: nn.Module, name: str) -> Tensor:
        p = plans[name]
        cfg = dataclasses.replace(spec.fisher_config(float(spec.fisher.damping), spec.seed), chunk=p.chunk or 64)
        if p.path is not None:
            cfg = dataclasses.replace(cfg, path=p.path)
        finv, lam = consumer_inverse(model, name, info.estimator(cfg, p.block_size), (x, y), dtype)
        lambdas[name] = lam
        return finv

    return blocks


def arch_kwargs(model: nn.Module) -> dict | None:
    """The zoo constructor arguments that changed: what to merge over the upload's ``arch_kwargs``."""
    if isinstance(model, MLP):
        linears = [m for m in model.layers if isinstance(m, nn.Linear)]
        return {"hidden": [m.out_features for m in linears[:-1]]}
    if isinstance(model, CifarResNet):
        return cifar_arch_kwargs(model)
    if isinstance(model, ResNet):
        blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
        convs = ("conv1", "conv2") if isinstance(blocks[0], Bottleneck) else ("conv1",)
        stages = (model.layer1, model.layer2, model.layer3, model.layer4)
        last = "conv3" if isinstance(blocks[0], Bottleneck) else "conv2"
        return {
            "inner": [getattr(b, c).out_channels for b in blocks for c in convs],
            "widths": [model.conv1.out_channels] + [getattr(stage[-1], last).out_channels for stage in stages],
        }
    if isinstance(model, LeNet5):
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
        return {"channels": [c.out_channels for c in convs], "fc": [m.out_features for m in linears[:-1]]}
    return None


def shrunk_config(families: list[Family], model: nn.Module) -> dict | None:
    """The Hugging Face config fields of the shrunk model (uniform FFN width: ``intermediate_size``; uniform
    attention: ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``)."""
    if not _is_hf(model):
        return None
    if any(f.kind == "heads" for f in families):
        try:
            return head_config(model, families)
        except ValueError as e:
            raise InvalidInput(str(e)) from e
    widths = {model.get_submodule(f.consumer).in_features for f in families if f.kind == "neurons"}
    if len(widths) != 1:
        raise InvalidInput(f"FFN widths differ across layers ({sorted(widths)}); a config holds one intermediate_size")
    return {"intermediate_size": widths.pop()}


def _calibration(x: Tensor, spec: PruneSpec) -> Tensor:
    n = min(len(x), spec.fisher_samples(len(x)))
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(spec.seed))[:n]
    return x[idx.to(x.device)]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _finetune(model, x, y, spec: PruneSpec, hooks, timer, point, metric, val, resume, save) -> None:
    """``finetune.epochs`` of plain (unmasked) training of the smaller model, from the epoch after the checkpoint's
    (``resume``: its tensors and meta, or None); ``save(epoch, optimizer)`` after every epoch."""
    ft = spec.finetune
    if not ft.epochs:
        return
    optimizer = make_optimizer(model, ft)
    first = 0
    if resume is not None:
        tensors, meta = resume
        first = meta["epoch"] + 1
        if "optimizer" in meta:
            restore_optimizer(optimizer, tensors, meta["optimizer"])
    for epoch in range(first, ft.epochs):
        if hooks.cancelled():
            raise Canceled("the run was canceled; its last checkpoint is kept")
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(ft, epoch)
        torch.manual_seed(spec.seed * 1000 + epoch)
        generator = torch.Generator().manual_seed(spec.seed * 7919 + epoch)
        with timer("finetune"):
            train_epoch(model, x, y, optimizer, loss=spec.loss, batch_size=ft.batch_size, masks={}, generator=generator)
        where = f"fine-tuning epoch {epoch + 1}/{ft.epochs}"
        check_weights(model, where, TRAIN_HINT)
        m = metric(*val)
        check_metrics(m, where, TRAIN_HINT)
        point(epoch, m)
        save(epoch, optimizer)
        hooks.progress(0.5 + 0.5 * (epoch + 1) / ft.epochs, f"fine-tuning epoch {epoch + 1}/{ft.epochs}")


def _save(checkpointer, timer, hooks, model: nn.Module, optimizer, meta: dict) -> None:
    """A checkpoint of the smaller model (and the optimizer) with ``meta`` (strict JSON)."""
    if checkpointer is None:
        return
    with timer("checkpoint"):
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        if optimizer is not None:
            opt_tensors, meta["optimizer"] = optimizer_state(optimizer)
            tensors.update(opt_tensors)
        checkpointer.save(tensors, json.loads(json_bytes(meta)))
    hooks.event("checkpoint", {"epoch": meta["epoch"], "phase": "trained" if meta["epoch"] >= 0 else "pruned"})


def _restore(model: nn.Module, families: list[Family], tensors: dict[str, Tensor], meta: dict) -> list[FamilyResult]:
    """Shrink the dense ``model`` to the units the checkpoint's families kept, then load its weights."""
    results = [FamilyResult(**r) for r in meta["results"]]
    if [r.name for r in results] != [f.name for f in families]:
        raise InvalidInput("the checkpoint's structure does not match this model's; retry the job from the start")
    for fam, r in zip(families, results):
        shrink(model, fam, torch.tensor(sorted(set(range(fam.units)) - set(r.removed)), dtype=torch.long))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return results


def _export(
    model: nn.Module, out_dir: Path, artifacts: dict[str, str], example: Tensor, hf_config: dict | None, onnx: bool
) -> tuple[dict[str, Path], str | None]:
    """``pruned.safetensors`` (under the upload's names), ``hf_model.zip`` for a Hugging Face model, and with
    ``onnx`` ``model.onnx`` (of a Hugging Face model: its adapter's graph, as the unstructured run exports it); (the
    artifacts written besides the report and the curve, why ONNX failed or None)."""
    out = {k: out_dir / artifacts[k] for k in ("pruned", "report", "curve_csv", "curve_png")}
    names = getattr(model, "source_names", None) or {}
    save_state_dict({names.get(k, k): v for k, v in model.state_dict().items()}, out["pruned"])
    if _is_hf(model):
        out |= model.export_artifacts(out_dir, {}, config_updates=hf_config)
    if not onnx:
        return out, None
    try:
        from core.io.onnx.export import export_onnx

        export_onnx(model, example, out_dir / artifacts["onnx"])
    except Exception as e:  # noqa: BLE001 (the weights are still good; say why in the report)
        return out, str(e)
    return out | {"onnx": out_dir / artifacts["onnx"]}, None


def _cpu_copy(model: nn.Module) -> nn.Module:
    p = next(model.parameters())
    here = p.device.type == "cpu" and p.dtype == torch.float32
    return model if here else copy.deepcopy(model).to("cpu", torch.float32)


def _latency(
    model: nn.Module, x: Tensor, config: LatencyConfig, runtimes: list[str], onnx: Path | None, example: Tensor | None
) -> dict[str, dict]:
    """{runtime: numbers} of ``model`` on ``x``; with ``example`` (the dense model, before the prune) ONNX Runtime
    runs a graph exported here to a scratch file (the smaller model's graph cannot take the dense weights)."""
    model = _cpu_copy(model)
    if example is None:
        return measure(model, x, config, runtimes, onnx)
    out = measure(model, x, config, [r for r in runtimes if r != ORT_CPU], dense=True, share_of=runtimes)
    if ORT_CPU in runtimes:
        from core.io.onnx.export import export_onnx

        try:
            export_onnx(model, example, onnx)
            out |= measure(model, x, config, [ORT_CPU], onnx, dense=True, share_of=runtimes)
        except Exception as e:  # noqa: BLE001 (a model that does not export: say why, the run goes on)
            out[ORT_CPU] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        finally:
            onnx.unlink(missing_ok=True)
    return out


def _size(dense_bytes: int, pruned: Path) -> dict:
    """The report's ``size`` section: the smaller model is dense, so it has no compressed form (nothing is zero)."""
    pruned_bytes = pruned.stat().st_size
    return {
        "dense_safetensors_bytes": dense_bytes,
        "pruned_safetensors_bytes": pruned_bytes,
        "pruned_to_dense": pruned_bytes / dense_bytes if dense_bytes else None,
        "compressed_bytes": None,
        "compressed_format": None,
        "why_not_compressed": "the structured model is smaller and dense: it has no zeros to compress",
    }


def _prune(model, families, spec: PruneSpec, calibration, scoring: dict, fisher, timer, hooks) -> list[FamilyResult]:
    """The prune itself, with global allocation's scoring pass first where asked; the families' results."""
    counts = None
    if spec.structure_allocation == "global":
        with timer("allocation"):
            curves = removal_curves(model, families, calibration, fisher=fisher, **scoring)
        counts = allocate(curves, [f.units for f in families], spec.sparsity)
    with timer("obs"):
        results = prune_structured(
            model,
            families,
            spec.sparsity,
            calibration,
            progress=lambda f: hooks.progress(0.5 * f, f"removing {spec.sparsity:.0%} of the {spec.structure}"),
            fisher=fisher,
            counts=counts,
            **scoring,
        )
    return results


def execute_structured(
    spec: PruneSpec,
    model: nn.Module,
    data: Dataset,
    out_dir: Path,
    hooks,
    device: torch.device,
    artifacts: dict[str, str],
    *,
    model_name: str | None = None,
    phases: PhaseTimer | None = None,
    latency: LatencyConfig | None = None,
    checkpointer=None,
    memory_budget_mb: float | None = None,
) -> tuple[dict[str, Path], dict]:
    """Prune ``model`` structurally per ``spec``, fine-tune it, write its artifacts (file names by kind:
    ``core.runs.run.ARTIFACTS``); (the artifacts written, the report). ``hooks``: a ``core.runs.run.RunHooks``;
    ``latency``: what measuring the dense and the smaller model's latency may spend (:mod:`core.runs.speed`);
    ``checkpointer``: a ``core.runs.checkpoint.Checkpointer`` (resumes from its last checkpoint when it holds one);
    ``memory_budget_mb``: the server's budget (the lower of it and the spec's applies to a woodfisher prune's plan)."""
    timer, peak = phases or PhaseTimer(), PeakMemory()
    peak.start()
    started = time.perf_counter()
    dtype = torch.float64 if spec.dtype == "float64" else torch.float32
    model = model.to(device, dtype)
    data = data if data.has_val else data.split(spec.val_fraction, spec.seed)

    def put(t: Tensor) -> Tensor:
        return t.to(device, dtype if t.is_floating_point() else t.dtype)

    x, y, xv, yv = put(data.x_train), put(data.y_train), put(data.x_val), put(data.y_val)
    spec = spec.resolved(len(x))
    families = check_structure(model, spec)
    info = method_info(spec.method)
    plan, consumer_plans = structured_plan(model, spec, families, memory_budget_mb)
    lambdas: dict[str, float | None] = {}
    fisher = _fisher_blocks(spec, consumer_plans, x, y, dtype, lambdas) if plan is not None else None
    curve: list[dict] = []

    def metric(xs: Tensor, ys: Tensor) -> dict:
        with timer("evaluation"):
            return evaluate(model, xs, ys, spec.loss)

    def point(step: int, epoch: int, kind: str, m: dict) -> None:
        score = m["accuracy"] if spec.metric == "accuracy" else m["loss"]
        p = {"step": step, "epoch": epoch, "kind": kind, "sparsity": removed_fraction(), "loss": m["loss"]}
        p |= {"metric": score, "split": "validation", "seconds": time.perf_counter() - started}
        curve.append(p)
        hooks.metric(p)

    example = xv[:1]
    latency = latency or default_latency()
    runtimes = runtimes_for("unstructured", spec.export.onnx)
    resume = checkpointer.load() if checkpointer is not None else None
    if resume is not None:  # the dense model's numbers come from the checkpoint; the model is shrunk as it was
        tensors, meta = resume
        results = _restore(model, families, tensors, meta)
        dense, before = meta["dense"], meta["before"]
        curve.extend(meta["curve"])
        hooks.event("resumed", {"epoch": meta["epoch"], "phase": "trained" if meta["epoch"] >= 0 else "pruned"})
    else:
        dense = {"params": _count(model)}
        before = {"validation": metric(xv, yv), "train": metric(x, y)}
        for split, m in before.items():
            check_metrics(m, f"before any pruning, on the {split} split", "check the model and the data")
        dense["macs"] = count_macs(model, example)[0]
        names = getattr(model, "source_names", None) or {}
        with timer("export"):
            state = {names.get(k, k): v.to("cpu", torch.float32) for k, v in model.state_dict().items()}
            dense["safetensors_bytes"] = dense_safetensors_bytes(state, Path(out_dir) / ".dense.safetensors")
        dense["latency"] = {}
        if latency.enabled:
            with timer("latency"):
                cpu_example = example.to("cpu", torch.float32) if example.is_floating_point() else example.cpu()
                dense["latency"] = _latency(model, xv, latency, runtimes, Path(out_dir) / ".dense.onnx", cpu_example)
    dense_params = dense["params"]

    def removed_fraction() -> float:
        return 1.0 - _count(model) / dense_params

    def save(epoch: int, optimizer) -> None:
        meta = {"epoch": epoch, "results": [dataclasses.asdict(r) for r in results], "dense": dense}
        _save(checkpointer, timer, hooks, model, optimizer, meta | {"before": before, "curve": curve})

    if resume is None:
        point(0, 0, "dense", before["validation"])
        hooks.event("started", {"structure": spec.structure, "families": len(families)})
        hooks.progress(0.0, f"removing {spec.sparsity:.0%} of the {spec.structure}")
        calibration = _calibration(x, spec) if info.group_saliency == "obs" else None
        scoring = {"saliency": info.group_saliency, "damp": spec.layerwise.damp, "batch": spec.layerwise.batch_size}
        step = peak.section() if plan is not None else contextlib.nullcontext()  # the prune's own peak, vs the plan
        with step:
            results = _prune(model, families, spec, calibration, scoring, fisher, timer, hooks)
        where = f"the structured prune ({spec.structure}, {spec.sparsity:g})"
        check_weights(model, where, _HINT)
        pruned = metric(xv, yv)
        check_metrics(pruned, where, _HINT)
        point(1, 0, "prune", pruned)
        hooks.event("pruned", {"step": 1, "sparsity": removed_fraction()})
        save(-1, None)
    _finetune(
        model,
        x,
        y,
        spec,
        hooks,
        timer,
        lambda epoch, m: point(2 + epoch, epoch, "epoch", m),
        metric,
        (xv, yv),
        resume if resume is not None and resume[1]["epoch"] >= 0 else None,
        save,
    )
    after = {"validation": metric(xv, yv), "train": metric(x, y)}
    model = model.to("cpu", torch.float32).eval()
    example = example.to("cpu", torch.float32) if example.is_floating_point() else example.cpu()
    structure = {
        "kind": spec.structure,
        "saliency": info.group_saliency,
        "allocation": {
            "kind": spec.structure_allocation,
            "score": ALLOCATION_SCORES[info.group_saliency] if spec.structure_allocation == "global" else None,
            "counts": [r.units - r.kept for r in results],
        },
        "fisher_lambdas": lambdas or None,
        "groups_total": sum(r.units for r in results),
        "groups_removed": sum(r.units - r.kept for r in results),
        "layers": [
            {"name": r.name, "units": r.units, "kept": r.kept, "removed": sorted(r.removed), "obs_loss": r.loss}
            for r in results
        ],
        "arch_kwargs": arch_kwargs(model),
        "hf_config": shrunk_config(families, model),
    }
    with timer("export"):
        out, onnx_error = _export(model, Path(out_dir), artifacts, example, structure["hf_config"], spec.export.onnx)
    speed = None
    if latency.enabled:
        with timer("latency"):
            pruned_latency = _latency(model, xv, latency, runtimes, out.get("onnx"), None)
        speed = speed_report(latency, dense["latency"], pruned_latency, "unstructured", True)
    total = _count(model)
    report = {
        "version": 1,
        "spec": spec.model_dump(mode="json", by_alias=True),
        "method": spec.method.value,
        "lambda": None,
        "structure": structure,
        "sparsity": {"target": spec.sparsity, "pruned_layers": removed_fraction(), "global": removed_fraction()},
        "parameters": {"total": total, "nonzero": total, "dense": dense_params},
        "macs": {"dense": dense["macs"], "sparse": count_macs(model, example)[0]},
        "metrics": {
            "before": before,
            "after": after,
            "splits": {
                "train": {"name": "train", "examples": len(x)},
                "validation": {"name": "validation", "examples": len(xv)},
            },
        },
        "curve": curve,
        "seconds": time.perf_counter() - started,
        "phases": timer.report(),
        "memory": peak.report(plan.total_bytes if plan is not None else None),
        "memory_plan": plan.as_dict() if plan is not None else None,
        "device": str(device),
        "onnx_error": onnx_error,
        "speed": speed,
        "size": _size(dense["safetensors_bytes"], out["pruned"]),
    }
    report = json_safe(report)
    atomic_write(out["curve_csv"], curve_csv(curve).encode())
    title = plot_title(model_name or type(model).__name__, spec.method.value, spec.sparsity, None)
    atomic_write(out["curve_png"], curve_png(curve, spec.metric, f"{title} ({spec.structure})"))
    atomic_write(out["report"], json_bytes(report, indent=2))
    hooks.progress(1.0, "done")
    return out, report
