"""PyTorch → ONNX with the torch.export-based ("dynamo") exporter, written atomically.

Exporter choice (torch 2.13 + onnxscript): ``torch.onnx.export(..., dynamo=True)`` is the default
and supported path (the TorchScript exporter is deprecated). Its stock optimizer, however, fuses
BatchNorm into the preceding Conv, which rescales the exported conv weights; a pruned model
should come out with the weights it was pruned to (and ONNX runtimes fuse BN themselves at load
time). So the program is exported unoptimized and then tidied with public onnxscript passes only:
constant folding, reshape-shape materialisation, removal of all-zero conv biases — no BN fusion.
The batch axis is dynamic. Should torch.export be unable to capture a model (data-dependent
control flow), the legacy TorchScript exporter is tried, with constant folding off for the same
reason (it traces, so such a model is exported for the path the example input takes).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from core.engine.modes import eval_mode
from core.io.files import atomic_path

log = logging.getLogger(__name__)


def _tidy(model_ir) -> onnx.ModelProto:
    """Polish with public onnxscript passes; any failure keeps the (valid) unpolished graph.

    Constants are folded except ``Transpose`` (so ``Transpose(fc.weight) → MatMul`` keeps the
    parameter's own name instead of becoming an anonymous ``val_N`` initializer); Shape→Concat→
    Reshape (flatten) becomes a constant ``[-1, n]`` reshape; the all-zero biases torchlib gives
    bias-free convs are dropped (they would otherwise come back as parameters).
    """
    from onnxscript import ir, optimizer

    proto = ir.serde.serialize_model(model_ir)
    try:
        optimizer.fold_constants(model_ir, should_fold=lambda node: False if node.op_type == "Transpose" else None)
        proto = ir.serde.serialize_model(model_ir)
        from onnxscript.rewriter import rewrite
        from onnxscript.rewriter.rules import common as rules

        tidy = [
            rules.materialize_reshape_shape_rule, rules.squeeze_reshape_1d_rule,
            rules.remove_optional_bias_from_conv_rule, rules.remove_optional_bias_from_gemm_rule,
        ]  # fmt: skip
        proto = rewrite(proto, tidy)
    except Exception as e:  # noqa: BLE001 (cosmetic, the exported graph is already valid)
        log.debug("ONNX tidy-up skipped: %s", e)
    return proto


def _inputs(model: nn.Module, x: Tensor) -> tuple[tuple[Tensor, ...], list[str]]:
    """The example inputs and their names: a packed model's named inputs (:mod:`core.io.onnx.packed`), else ``x``."""
    unpack = getattr(model, "unpack", None)
    if unpack is None:
        return (x,), ["input"]
    return unpack(x), list(model.input_names)


def _dynamo(model: nn.Module, x: Tensor) -> onnx.ModelProto:
    if x.shape[0] == 1:  # torch.export specialises size-1 dims, which would pin the batch to 1
        x = torch.cat([x, x])
    args, names = _inputs(model, x)
    batch = {0: torch.export.Dim("batch")}
    params = list(inspect.signature(model.forward).parameters.values())
    varargs = bool(params) and params[0].kind is inspect.Parameter.VAR_POSITIONAL  # e.g. OnnxModule.forward(*args)
    dims = tuple(batch for _ in args)
    program = torch.onnx.export(
        model, args, dynamo=True, optimize=False, verbose=False, input_names=names, output_names=["output"],
        dynamic_shapes=(dims,) if varargs else dims,
    )  # fmt: skip
    return _tidy(program.model)


def _legacy(model: nn.Module, x: Tensor, tmp: Path) -> onnx.ModelProto:
    args, names = _inputs(model, x)
    with warnings.catch_warnings():  # deprecation and tracer warnings: expected on this fallback path
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(tmp), dynamo=False, do_constant_folding=False, input_names=names,
            output_names=["output"], dynamic_axes={n: {0: "batch"} for n in [*names, "output"]},
        )  # fmt: skip
    return onnx.load(str(tmp))


def export_onnx(model: nn.Module, example_input: Tensor, path: Path) -> Path:
    """Export ``model`` (in eval mode; its mode is restored) to ``path``; returns ``path``.

    The graph must pass ``onnx.checker``. It is written through :func:`core.io.files.atomic_path`, so a
    reader never sees a half-written model and a failure leaves nothing behind.
    """
    with atomic_path(path) as tmp, eval_mode(model):
        with torch.no_grad():
            try:
                proto = _dynamo(model, example_input)
            except Exception as e:  # noqa: BLE001 (torch.export could not capture the model)
                first = (str(e).strip().splitlines() or [""])[0][:300]
                log.warning(
                    "dynamo ONNX export failed (%s: %s); trying the TorchScript exporter", type(e).__name__, first
                )
                proto = _legacy(model, example_input, tmp)  # the temporary file doubles as its scratch file
        onnx.checker.check_model(proto)
        tmp.write_bytes(proto.SerializeToString())
    return Path(path)


__all__ = ["export_onnx"]
