"""Does a model run on a dataset? A forward pass on two examples (or on shapes alone) before a run starts."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from core.engine.grads import Loss
from core.engine.modes import eval_mode
from core.errors import InvalidInput
from core.io.data.dataset import Dataset, field_error


def _expected_input(model: nn.Module) -> str:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return f"inputs of {m.in_features} features"
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = {nn.Conv1d: "(C, L)", nn.Conv2d: "(C, H, W)", nn.Conv3d: "(C, D, H, W)"}[type(m)]
            return f"inputs shaped {dims} with C={m.in_channels}"
    return "a different input shape"


def _loss_kind(loss: str) -> Loss:
    try:
        return Loss(loss)
    except ValueError as e:
        raise InvalidInput(f"unknown loss {loss!r}: use one of {[kind.value for kind in Loss]}") from e


def _outputs(model: nn.Module, x: Tensor, input_shape: tuple[int, ...], *, may_not_know: bool = False) -> Tensor | None:
    """``model(x)`` in eval mode without grad; a shape error → InvalidInput. With ``may_not_know`` an op that
    cannot run where ``x`` lives (no 'meta' kernel) gives ``None``: no verdict, rather than a false refusal."""
    try:
        with eval_mode(model), torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        if may_not_know and isinstance(e, NotImplementedError):
            return None
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else e.__class__.__name__
        raise InvalidInput(
            f"the model does not run on the data: model expects {_expected_input(model)}, "
            f"data has examples shaped {tuple(input_shape)} ({first})",
            errors=[field_error(["dataset", "input_shape"], "incompatible with the model")],
        ) from e
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != len(x):
        raise InvalidInput(
            "the model must return one output row per example "
            f"(got {type(out).__name__}{'' if not isinstance(out, Tensor) else ' of shape ' + str(tuple(out.shape))})"
        )
    return out


def _check_targets(out: Tensor, kind: Loss, *, float_labels: bool, top: int | None, per_y: int | None) -> None:
    """Model outputs against the labels: integer classes in range for cross_entropy (``top`` the largest label),
    one target per output for mse (``per_y`` targets per example; ``None``: not known, not checked)."""
    if kind is Loss.CROSS_ENTROPY:
        if out.dim() != 2:
            raise InvalidInput(f"cross_entropy needs model outputs shaped (N, classes), got {tuple(out.shape)}")
        k = int(out.shape[1])
        if float_labels:
            raise InvalidInput(
                "cross_entropy needs integer class labels, the data has float targets "
                "(store labels as integers, or use the mse loss for regression)",
                errors=[field_error(["dataset", "labels"], "float targets", "value_error")],
            )
        if top is not None and top >= k:
            raise InvalidInput(
                f"labels range over [0, {top}] but the model has {k} outputs: labels must lie in [0, {k})",
                errors=[field_error(["dataset", "labels"], f"label {top} out of range for {k} outputs")],
            )
    elif per_y is not None:
        per_out = math.prod(out.shape[1:])
        if per_out != per_y:
            raise InvalidInput(
                f"mse needs one target per model output: the model gives {per_out} value(s) per example, "
                f"the data has {per_y}"
            )


def check_compatible(model: nn.Module, data: Dataset, loss: str = "cross_entropy") -> None:
    """Run ``model`` (eval mode, no grad) on two examples; shape or label problems → InvalidInput."""
    kind = _loss_kind(loss)
    out = _outputs(model, data.x_train[:2], data.input_shape)
    assert out is not None
    labels = [data.y_train] + ([data.y_val] if data.y_val is not None else [])
    float_labels = any(y.is_floating_point() for y in labels)
    _check_targets(
        out,
        kind,
        float_labels=float_labels,
        top=None if float_labels else max(int(y.max()) for y in labels),
        per_y=math.prod(data.y_train.shape[1:]),
    )


def check_compatible_shapes(
    model: nn.Module, input_shape: tuple[int, ...] | list[int], num_classes: int | None, loss: str = "cross_entropy"
) -> None:
    """:func:`check_compatible` from a dataset's summary alone (a :class:`DatasetInfo`'s ``input_shape`` and
    ``num_classes``, ``None`` for float targets), for a job not yet run.

    Build ``model`` on the ``"meta"`` device and the forward pass only propagates shapes: nothing is
    allocated or computed. An op without a meta kernel ends the check without a verdict (the run checks
    the real data). mse targets are not summarised, so only their input shape is checked here.
    """
    kind = _loss_kind(loss)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    shape = tuple(int(d) for d in input_shape)
    out = _outputs(model, torch.zeros((2, *shape), device=device), shape, may_not_know=True)
    if out is None:
        return
    _check_targets(
        out,
        kind,
        float_labels=num_classes is None and kind is Loss.CROSS_ENTROPY,
        top=None if num_classes is None else int(num_classes) - 1,
        per_y=None,
    )
