"""A job checked before it is queued, from what is stored about its inputs: no weights loaded, no data read.

The run checks everything again on the real model and data (:class:`core.runs.run.Run`,
:func:`core.io.data.check_compatible`); these checks move the common mistakes to job creation, where they are a
422 rather than a failed job, and never refuse a job that the run would accept:

* the Fisher estimate needs no more examples than the training split holds;
* a zoo model (safetensors weights + ``arch``) runs on the data's input shape, and its outputs cover the
  labels: the architecture is built on the ``meta`` device, so this costs no memory and no compute.
  ONNX models are left to the run (their graph has to be loaded to know its shapes).

Field errors are located in the job request: ``["spec", ...]`` and ``["dataset_id"]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.errors import InvalidInput
from core.io.data import check_compatible_shapes, max_train_examples
from core.io.model_files import build_architecture
from core.runs.spec import PruneSpec

__all__ = ["check_job"]


def _check_samples(spec: PruneSpec, num_examples: int, has_val: bool) -> None:
    need = spec.fisher_examples
    most = max_train_examples(num_examples, has_val, spec.val_fraction)
    if need <= most:
        return
    split = (
        f"at most {most} of its {num_examples} examples, less its own validation split"
        if has_val
        else f"{num_examples} examples less a {spec.val_fraction:g} validation split"
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


def _check_fit(
    spec: PruneSpec, arch: str, arch_kwargs: dict | None, input_shape: Sequence[int], num_classes: int | None
) -> None:
    model = build_architecture(arch, arch_kwargs, device="meta")
    try:
        check_compatible_shapes(model, tuple(input_shape), num_classes, spec.loss.value)
    except InvalidInput as e:
        raise InvalidInput(
            e.detail,
            errors=[{**err, "loc": ["dataset_id"]} for err in e.errors]
            or [{"loc": ["dataset_id"], "msg": "does not fit the model", "type": "value_error"}],
        ) from None


def check_job(
    spec: PruneSpec,
    *,
    arch: str | None,
    arch_kwargs: dict | None,
    num_examples: int | None,
    input_shape: Sequence[int] | None,
    num_classes: int | None,
    has_val: bool,
) -> None:
    """Every problem found (not just the first) in one :class:`InvalidInput`. ``arch`` is ``None`` for models
    without a zoo architecture (ONNX); unknown summary values (``None``) skip the checks that need them."""
    problems: list[InvalidInput] = []
    if num_examples is not None:
        try:
            _check_samples(spec, int(num_examples), bool(has_val))
        except InvalidInput as e:
            problems.append(e)
    if arch and input_shape:
        try:
            _check_fit(spec, arch, arch_kwargs, input_shape, num_classes)
        except InvalidInput as e:
            problems.append(e)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise InvalidInput("; ".join(p.detail for p in problems), errors=[e for p in problems for e in p.errors])


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
