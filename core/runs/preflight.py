"""A job checked before it is queued, from what is stored about its inputs: no weights loaded, no data read.

The run checks everything again on the real model and data (:class:`core.runs.run.Run`,
:func:`core.io.data.check_compatible`); these checks move the common mistakes to job creation, where they are a
422 rather than a failed job, and never refuse a job that the run would accept:

* the Fisher estimate needs no more examples than the training split holds;
* a zoo model (safetensors weights + ``arch``) runs on the data's input shape, and its outputs cover the
  labels: the architecture is built on the ``meta`` device, so this costs no memory and no compute;
* the memory plan of a pruning step over that architecture's selected weights fits the budget (the lower of the
  spec's ``memory_budget_mb`` and the server's ``ARBORIST_MEMORY_BUDGET_MB``): 422 ``memory-budget-exceeded``
  with the numbers (:mod:`core.runs.budget`), after the problems above (a plan of a model that does not fit its
  data means nothing).

ONNX models are left to the run (their graph has to be loaded to know its shapes); it checks the same plan
against the same budget before any work.

Field errors are located in the job request: ``["spec", ...]`` and ``["dataset_id"]``.
"""

from __future__ import annotations

import copy
import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from core.engine.activations import saved_bytes_per_sample
from core.engine.memory import MemoryPlan
from core.engine.methods import method_info
from core.errors import InvalidInput
from core.io.data import check_compatible_shapes, max_train_examples
from core.io.model_files import build_architecture
from core.runs.budget import available_memory_bytes, memory_plan
from core.runs.patterns import check_pattern
from core.runs.run import calibration_size, pruned_names
from core.runs.spec import PruneSpec
from core.runs.structured import HEADS_MODEL_TYPES, check_structure, hf_global_error, hf_heads_error, structured_plan

__all__ = ["check_job"]


def _train_examples(spec: PruneSpec, num_examples: int | None, has_val: bool) -> int | None:
    """An upper bound on the examples the Fisher estimate may draw: the training split, less the calibration split
    that λ or R = 'auto' holds out of it."""
    if num_examples is None:
        return None
    most = max_train_examples(int(num_examples), bool(has_val), spec.val_fraction)
    return most - calibration_size(most) if spec.calibrates and most else most


def _check_samples(spec: PruneSpec, num_examples: int, has_val: bool) -> None:
    need = spec.fisher_examples
    most = _train_examples(spec, num_examples, has_val)
    if need <= most:
        return
    split = (
        f"at most {most} of its {num_examples} examples, less its own validation split"
        if has_val
        else f"{num_examples} examples less a {spec.val_fraction:g} validation split"
    ) + (
        ", less the calibration split of 'auto' (lambda or recompute)"
        if most < max_train_examples(num_examples, has_val, spec.val_fraction)
        else ""
    )
    raise InvalidInput(
        f"fisher.samples × fisher.batch_size = {need} exceeds the {most} training examples of the dataset ({split})",
        errors=[
            {
                "loc": ["spec", "fisher", "samples"],
                "msg": f"at most {most} with this dataset",
                "type": "less_than_equal",
            }
        ],
    )


def _check_fit(model: nn.Module, spec: PruneSpec, input_shape: Sequence[int], num_classes: int | None) -> None:
    try:
        check_compatible_shapes(model, tuple(input_shape), num_classes, spec.loss.value)
    except InvalidInput as e:
        raise InvalidInput(
            e.detail,
            errors=[{**err, "loc": ["dataset_id"]} for err in e.errors]
            or [{"loc": ["dataset_id"], "msg": "does not fit the model", "type": "value_error"}],
        ) from None


def _check_plan(
    model: nn.Module, spec: PruneSpec, server_budget_mb: float | None, input_shape: Sequence[int] | None
) -> MemoryPlan | None:
    """The plan of a pruning step (``None`` for methods that take no gradients, as in the run's report); with the
    input shape known, a gradient chunk's activations counted as the run counts them."""
    params = dict(model.named_parameters())
    names = pruned_names(model, spec)
    shapes = {n: tuple(params[n].shape) for n in names}
    check_pattern(spec, shapes)
    activations = None
    if input_shape and method_info(spec.method).needs_gradients:
        example = torch.empty(spec.fisher.batch_size, *input_shape, device="meta")
        activations = saved_bytes_per_sample(model, example, names)
    plan = memory_plan(spec, shapes, server_budget_mb, activations)
    return plan if method_info(spec.method).needs_gradients else None


#: checks that passed, by their inputs (a burst of job creations repeats the same few): {key: plan}, newest last
_PASSED: OrderedDict[str, MemoryPlan | None] = OrderedDict()
_PASSED_MAX = 256
_passed_lock = threading.Lock()


def _remember_passed(check: Callable[..., MemoryPlan | None]) -> Callable[..., MemoryPlan | None]:
    """``check(spec, **summary)``, remembered for the last 256 argument sets that passed (a refusal is checked
    again each time); each caller gets its own copy of the plan. Without a budget, ``block_size: auto`` plans within
    the memory available now (:mod:`core.runs.budget`), so that is part of the key too, to 256 MiB."""

    @functools.wraps(check)
    def remembered(spec: PruneSpec, **summary: Any) -> MemoryPlan | None:
        now = available_memory_bytes() >> 28
        key = json.dumps([spec.model_dump(mode="json", by_alias=True), summary, now], sort_keys=True, default=str)
        with _passed_lock:
            if key in _PASSED:
                _PASSED.move_to_end(key)
                return copy.deepcopy(_PASSED[key])
        plan = check(spec, **summary)
        with _passed_lock:
            _PASSED[key] = copy.deepcopy(plan)
            while len(_PASSED) > _PASSED_MAX:
                _PASSED.popitem(last=False)
        return plan

    return remembered


@_remember_passed
def check_job(
    spec: PruneSpec,
    *,
    arch: str | None,
    arch_kwargs: dict | None,
    num_examples: int | None,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
    has_val: bool,
    server_budget_mb: float | None = None,
    model_format: str | None = None,
) -> MemoryPlan | None:
    """Every problem found (not just the first) in one :class:`InvalidInput`, then the memory plan
    (:class:`core.errors.DoesNotFit`); returns that plan (``None`` without a zoo architecture, or for a method
    that takes no gradients). ``arch`` is ``None`` for models without a zoo architecture (ONNX); unknown
    summary values (``None``) skip the checks that need them.

    A function of its arguments (and the memory available), so a check that passed is remembered
    (:func:`_remember_passed`): the model built on the ``meta`` device and its two forwards took 7 ms of the GIL per
    job creation, most of what a burst of creations for one model waited on."""
    problems: list[InvalidInput] = []
    spec = spec.resolved(_train_examples(spec, num_examples, has_val))  # the default fisher.samples fits the data
    model = build_architecture(arch, arch_kwargs, device="meta") if arch else None
    if num_examples is not None:
        try:
            _check_samples(spec, int(num_examples), bool(has_val))
        except InvalidInput as e:
            problems.append(e)
    if model is not None and input_shape:
        try:
            _check_fit(model, spec, input_shape, num_classes)
        except InvalidInput as e:
            problems.append(e)
    model_type = (arch_kwargs or {}).get("model_type") if model_format == "huggingface" else None
    if model_type is not None and spec.structure == "heads" and model_type not in HEADS_MODEL_TYPES:
        problems.append(hf_heads_error(model_type))  # (a Hugging Face model's arch_kwargs: what its upload held)
    if model_format == "huggingface" and spec.structure_allocation == "global":
        problems.append(hf_global_error())
    families = None
    if model is not None and spec.structure != "unstructured":
        try:
            families = check_structure(model, spec)
        except InvalidInput as e:
            problems.append(e)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise InvalidInput("; ".join(p.detail for p in problems), errors=[e for p in problems for e in p.errors])
    if spec.structure != "unstructured":  # woodfisher: its largest consumer's plan; else None (layer-wise Hessians)
        return structured_plan(model, spec, families, server_budget_mb)[0] if families else None
    return _check_plan(model, spec, server_budget_mb, input_shape) if model is not None else None


def warm_up() -> None:
    """Runs the checks once on a tiny zoo model. Their first run imports what building on the ``meta`` device
    pulls in (~800 modules, sympy among them: 0.7 s holding the GIL); a server calls this at start-up, so that
    its first job creation does not stall every other request meanwhile."""
    check_job(
        PruneSpec(sparsity=0.5),
        arch="mlp",
        arch_kwargs={"in_features": 4, "hidden": [4], "num_classes": 2},
        num_examples=None,
        input_shape=[4],
        num_classes=2,
        has_val=False,
    )
