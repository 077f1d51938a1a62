"""Non-finite numbers in a run: the checks that stop a run whose weights or loss became NaN or ±Infinity (a
:class:`core.errors.NumericalError` that says where and what to change, instead of a "succeeded" job with NaN
weights), and JSON that never holds ``NaN``/``Infinity`` (which ``json.dumps`` writes by default and no JSON
parser has to accept)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from core.errors import NumericalError

#: what to change when a pruning step (or the λ it uses) gives non-finite numbers
PRUNE_HINT = "use a larger fisher.lambda (λ, at most 1e12), or dtype float64"
#: what to change when fine-tuning diverges
TRAIN_HINT = "lower finetune.lr (or finetune.weight_decay)"


def prune_hint(lam: float | None) -> str:
    """What to change after a pruning step at dampening ``lam`` went non-finite."""
    if lam is not None and not (math.isfinite(lam) and lam <= 1e12):
        return f"λ = {lam:g} overflows: use a finite fisher.lambda of at most 1e12"
    return PRUNE_HINT


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON ``null``), tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_bytes(value: Any, **kwargs: Any) -> bytes:
    """Strict JSON of ``value`` (non-finite floats as ``null``); anything else ``json.dumps`` cannot write raises."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs).encode()


def nonfinite(tensors: Iterable[tuple[str, Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or ±Infinity."""
    return [n for n, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _listed(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def check_weights(model: nn.Module, where: str, hint: str) -> None:
    """Raises :class:`NumericalError` if a parameter of ``model`` is not finite (``where``: which step)."""
    bad = nonfinite(model.named_parameters())
    if bad:
        raise NumericalError(
            f"{where} made the weights non-finite (NaN or ±Infinity) in {_listed(bad)}; {hint}",
            errors=[{"loc": ["weights", name], "msg": "non-finite", "type": "non_finite"} for name in bad],
        )


def check_metrics(metrics: Mapping[str, float], where: str, hint: str) -> None:
    """Raises :class:`NumericalError` if an evaluated loss or metric is not finite."""
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise NumericalError(
            f"{where}: the {' and '.join(bad)} on the data is {metrics[bad[0]]} (not finite); {hint}",
            errors=[{"loc": ["metrics", k], "msg": "non-finite", "type": "non_finite"} for k in bad],
        )
