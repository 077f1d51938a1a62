"""Model zoo: hand-written architectures (no torchvision) behind a name registry.

Every model is built from nn.Linear / nn.Conv2d / nn.BatchNorm2d modules (pruning selects weights
by module type) and has a shape-static, in-place-free ``forward`` so that it runs under
``torch.func.functional_call`` + ``vmap(grad(...))`` in eval mode.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from core.errors import InvalidInput, out_of_memory_error
from core.io.zoo.lenet import LeNet5
from core.io.zoo.mlp import MLP
from core.io.zoo.mobilenet import MobileNetV1
from core.io.zoo.resnet import resnet18, resnet50
from core.io.zoo.resnet_cifar import resnet20, resnet32, resnet56

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "mobilenet_v1": MobileNetV1,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


def _params(arch: str) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(ARCHITECTURES[arch]).parameters)


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate ``arch`` with ``kwargs``; any user mistake becomes ``InvalidInput``.

    Unknown keyword names are checked against the constructor signature first, so the message
    names them instead of surfacing a bare ``TypeError``; value errors raised by the constructor
    (e.g. a depth or shortcut it does not know) are translated too.
    """
    if arch not in ARCHITECTURES:
        raise InvalidInput(
            f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}",
            errors=[{"loc": ["arch"], "msg": "unknown architecture", "type": "value_error"}],
        )
    allowed = _params(arch)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise InvalidInput(
            f"unknown argument(s) for {arch}: {', '.join(unknown)}; allowed: {', '.join(allowed)}",
            errors=[{"loc": ["kwargs", k], "msg": "unknown argument", "type": "value_error"} for k in unknown],
        )
    try:
        return ARCHITECTURES[arch](**kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        if out_of_memory_error(e) is not None:  # too big to build is not a wrong argument
            raise
        raise InvalidInput(
            f"bad arguments for {arch}: {e}", errors=[{"loc": ["kwargs"], "msg": str(e), "type": "value_error"}]
        ) from e


def describe() -> dict[str, dict]:
    """``{arch: {"doc": first docstring line, "args": {name: {"default": …, "type": …}}}}`` for docs/API."""
    out: dict[str, dict] = {}
    for arch, ctor in ARCHITECTURES.items():
        args = {}
        for name, p in _params(arch).items():
            default = p.default
            if isinstance(default, tuple):
                default = list(default)
            args[name] = {
                "default": None if default is inspect.Parameter.empty else default,
                "required": default is inspect.Parameter.empty,
                "type": p.annotation
                if isinstance(p.annotation, str)
                else getattr(p.annotation, "__name__", str(p.annotation)),
            }
        doc = inspect.cleandoc(ctor.__doc__ or inspect.getmodule(ctor).__doc__ or "")  # own doc, not nn.Module's
        out[arch] = {"doc": doc.splitlines()[0] if doc else "", "args": args}
    return out


__all__ = ["ARCHITECTURES", "build_model", "describe"]
