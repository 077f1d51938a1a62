"""Measured latency of the dense and the pruned model, for every job's report.

Each runtime (PyTorch on the CPU, ONNX Runtime on the CPU from the exported graph, and with CUDA present PyTorch on
the GPU and, for 2:4 masks on a GPU that has the kernels, ``torch.sparse.to_sparse_semi_structured``) runs the
model on the job's validation examples at batch 1 and at a larger batch (``min(32, n)``). A measurement is one
warm-up call, then timed calls until its share of the budget is spent or ``max_repeats`` calls were made (at least
one); the report gives the median and the minimum in milliseconds and how many calls were timed.

The budget (``Settings.latency_budget_s``, default 1 s; 0 turns measuring off) is split evenly over the
measurements a job makes, dense and pruned, so a tiny job spends about a second. The dense model is measured when
the run starts (before any pruning); the dense ONNX graph is the pruned one with the dense weights put back into its
initializers (same graph, so only the values differ), which needs the dense weights of the pruned layers kept from
the start: a resumed run reports that number as not measured.

Whether a pattern can be faster at all is stated per runtime (:func:`kernel`): no maintained CPU runtime has
kernels for unstructured, block or N:M zeros stored dense ("size only"), 2:4 has the semi-structured GPU kernels,
and a model whose shapes shrank (structured pruning) is faster everywhere it does less work.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from core.engine.modes import eval_mode
from core.engine.patterns import Pattern

__all__ = [
    "LatencyConfig",
    "batches",
    "default_latency",
    "dense_onnx",
    "kernel",
    "measure",
    "measure_dense_onnx",
    "onnx_latency",
    "runtimes_for",
    "speed_report",
    "time_call",
    "torch_latency",
]

TORCH_CPU, ORT_CPU, TORCH_CUDA, CUDA_24 = "torch_cpu", "onnxruntime_cpu", "torch_cuda", "torch_cuda_semi_structured"


@dataclass(frozen=True)
class LatencyConfig:
    """``budget_s``: seconds for all of a job's measurements (0: measure nothing); ``batch_sizes``: the batches
    (each capped by the examples there are); ``max_repeats``: timed calls per measurement at most."""

    budget_s: float = 1.0
    batch_sizes: tuple[int, ...] = (1, 32)
    max_repeats: int = 50

    @property
    def enabled(self) -> bool:
        return self.budget_s > 0


_default = LatencyConfig()


def default_latency() -> LatencyConfig:
    """What a run measures when its caller passes no :class:`LatencyConfig` (the CLI, benches, tests); the worker
    passes the settings' (``ARBORIST_LATENCY_BUDGET_S``, ``ARBORIST_LATENCY_BATCH_SIZES``)."""
    return _default


def set_default_latency(config: LatencyConfig) -> None:
    """Replace :func:`default_latency` for this process (the test suite spends less time measuring)."""
    global _default
    _default = config


def time_call(fn: Callable[[], object], budget_s: float, max_repeats: int, sync: Callable[[], None] | None = None):
    """One warm-up call, then timed calls until ``budget_s`` is spent or ``max_repeats`` were made (at least one):
    {"median_ms", "min_ms", "repeats"}."""
    sync = sync or (lambda: None)
    fn()
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while not times or (len(times) < max_repeats and time.perf_counter() < deadline):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "repeats": len(times)}


def batches(x: Tensor, batch_sizes: tuple[int, ...]) -> dict[str, Tensor]:
    """{"batch_<b>": the first b examples} for each of ``batch_sizes`` capped at ``len(x)``, without repeats."""
    sizes = sorted({max(1, min(int(b), len(x))) for b in batch_sizes})
    return {f"batch_{b}": x[:b] for b in sizes}


def _cpu_input(x: Tensor) -> Tensor:
    return x.detach().to("cpu", torch.float32) if x.is_floating_point() else x.detach().cpu()


def torch_latency(
    model: nn.Module, inputs: Mapping[str, Tensor], budget_s: float, max_repeats: int, device: str = "cpu"
) -> dict:
    """{batch key: :func:`time_call`'s numbers} of ``model`` (on ``device`` already) in eval mode, without grad."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    out = {}
    with torch.inference_mode(), eval_mode(model):
        for key, x in inputs.items():
            x = x.to(device)
            out[key] = time_call(lambda x=x: model(x), budget_s, max_repeats, sync)
    return out


def onnx_latency(graph: bytes | str | Path, inputs: Mapping[str, Tensor], budget_s: float, max_repeats: int) -> dict:
    """{batch key: :func:`time_call`'s numbers} of an ONNX graph (bytes or a path) in ONNX Runtime on the CPU, with
    as many threads as PyTorch uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        graph if isinstance(graph, bytes) else str(graph), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    out = {}
    for key, x in inputs.items():
        feed = {name: _cpu_input(x).numpy()}
        out[key] = time_call(lambda feed=feed: session.run(None, feed), budget_s, max_repeats)
    return out


def dense_onnx(path: str | Path, dense: Mapping[str, Tensor]) -> bytes:
    """The ONNX graph at ``path`` with the initializers named in ``dense`` set to those values; ValueError when one
    is missing or has another shape (a graph whose names or shapes are not the model's)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    for name, value in dense.items():
        init = inits.get(name)
        if init is None or list(init.dims) != list(value.shape):
            raise ValueError(f"the exported graph has no initializer {name!r} of shape {list(value.shape)}")
        array = value.detach().to("cpu", torch.float32).numpy()
        init.CopyFrom(numpy_helper.from_array(array.astype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)), name))
    return model.SerializeToString()


def semi_structured_supported() -> bool:
    """A CUDA device with the 2:4 semi-structured kernels (compute capability ≥ 8.0)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def semi_structured_copy(model: nn.Module) -> nn.Module:
    """A half-precision CUDA copy of ``model`` whose 2-D Linear weights are ``to_sparse_semi_structured``."""
    from torch.sparse import to_sparse_semi_structured

    clone = copy.deepcopy(model).to("cuda", torch.float16).eval()
    for module in clone.modules():
        if isinstance(module, nn.Linear) and module.weight.shape[1] % 64 == 0 and module.weight.shape[0] % 32 == 0:
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    return clone


def kernel(pattern: str | None, runtime: str, shapes_changed: bool) -> dict:
    """{"faster": whether the runtime has a kernel that turns this pruning into speed, "verdict", "why"}."""
    if shapes_changed:
        return {"faster": True, "verdict": "speedup", "why": "the pruned model has smaller shapes: less work"}
    p = Pattern.parse(pattern)
    if runtime == CUDA_24 and p.kind == "nm" and (p.n, p.m) == (2, 4):
        return {"faster": True, "verdict": "speedup", "why": "2:4 semi-structured sparse kernels (CUTLASS/cuSPARSELt)"}
    return {
        "faster": False,
        "verdict": "size only",
        "why": f"{runtime} has no kernel for {p} zeros stored in dense tensors; the gain is the compressed size",
    }


def _ratio(dense: dict | None, pruned: dict | None) -> dict:
    if not dense or not pruned:
        return {}
    return {
        k: dense[k]["median_ms"] / pruned[k]["median_ms"]
        for k in pruned
        if k in dense and "median_ms" in dense[k] and pruned[k].get("median_ms")
    }


def speed_report(
    config: LatencyConfig,
    dense: Mapping[str, dict],
    pruned: Mapping[str, dict],
    pattern: str | None,
    shapes_changed: bool,
) -> dict:
    """The report's ``speed`` section: per runtime the dense and the pruned numbers (or why one is missing:
    ``{"error": ...}``), the speedup (dense median over pruned median) per batch and :func:`kernel`'s verdict."""
    runtimes = {}
    for rt in dict.fromkeys([*dense, *pruned]):
        d, p = dense.get(rt), pruned.get(rt)
        ok = d is not None and "error" not in d and p is not None and "error" not in p
        runtimes[rt] = {
            "dense": d,
            "pruned": p,
            "speedup": _ratio(d, p) if ok else {},
            **kernel(pattern, rt, shapes_changed),
        }
    return {
        "statistic": "median of repeats, milliseconds per call",
        "budget_s": config.budget_s,
        "batch_sizes": list(config.batch_sizes),
        "threads": torch.get_num_threads(),  # PyTorch's and ONNX Runtime's intra-op threads
        "runtimes": runtimes,
    }


def runtimes_for(pattern: str | None, onnx: bool = True) -> list[str]:
    """The runtimes a job measures: PyTorch CPU, ONNX Runtime CPU from the job's exported graph (when it exports one,
    ``onnx``: the spec's ``export.onnx``; a failed export is reported as not measured), and with CUDA PyTorch on the
    GPU (plus the semi-structured kernels for 2:4 where the GPU has them)."""
    runtimes = [TORCH_CPU, ORT_CPU] if onnx else [TORCH_CPU]
    if torch.cuda.is_available():
        runtimes.append(TORCH_CUDA)
        p = Pattern.parse(pattern)
        if p.kind == "nm" and (p.n, p.m) == (2, 4) and semi_structured_supported():
            runtimes.append(CUDA_24)
    return runtimes


def share(config: LatencyConfig, runtimes: list[str], inputs: Mapping[str, Tensor]) -> float:
    """Seconds per measurement: the budget over every measurement of the job (dense and pruned)."""
    return config.budget_s / max(1, 2 * len(runtimes) * len(inputs))


def measure(
    model: nn.Module,
    x: Tensor,
    config: LatencyConfig,
    runtimes: list[str],
    onnx_graph: bytes | str | Path | None = None,
    *,
    dense: bool = False,
    share_of: list[str] | None = None,
) -> dict[str, dict]:
    """{runtime: {batch key: numbers}} of a CPU float32 ``model`` on the first examples of ``x``; a runtime that
    fails says why (``{"error": ...}``) instead of failing the job. ONNX Runtime runs ``onnx_graph`` (skipped, with
    the reason, when None). ``dense``: the dense baseline, which the semi-structured runtime runs as plain half
    precision (its kernels assume 2:4 weights). ``share_of``: the runtimes the budget is split over (default
    ``runtimes``), for a caller that measures some of them elsewhere."""
    inputs = batches(_cpu_input(x), config.batch_sizes)
    each = share(config, share_of or runtimes, inputs)
    out: dict[str, dict] = {}
    for rt in runtimes:
        try:
            if rt == TORCH_CPU:
                out[rt] = torch_latency(model, inputs, each, config.max_repeats)
            elif rt == ORT_CPU:
                if onnx_graph is None:
                    out[rt] = {"error": "no ONNX graph to run"}
                    continue
                out[rt] = onnx_latency(onnx_graph, inputs, each, config.max_repeats)
            elif rt == TORCH_CUDA:
                out[rt] = torch_latency(copy.deepcopy(model).to("cuda"), inputs, each, config.max_repeats, "cuda")
            elif rt == CUDA_24:
                half = {k: v.half() if v.is_floating_point() else v for k, v in inputs.items()}
                gpu = copy.deepcopy(model).to("cuda", torch.float16) if dense else semi_structured_copy(model)
                out[rt] = torch_latency(gpu, half, each, config.max_repeats, "cuda")
        except Exception as e:  # noqa: BLE001 (a runtime that cannot run this model is reported, never fatal)
            out[rt] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return out


def measure_dense_onnx(
    onnx_path: Path | None,
    dense_weights: Mapping[str, Tensor] | None,
    x: Tensor,
    config: LatencyConfig,
    runtimes: list[str],
) -> dict:
    """ONNX Runtime's numbers for the dense graph: the pruned graph at ``onnx_path`` with ``dense_weights`` put back
    (:func:`dense_onnx`); ``{"error": why}`` when there is no graph, no dense weights (a resumed run) or they do not
    fit it."""
    if onnx_path is None:
        return {"error": "no ONNX graph to run"}
    if dense_weights is None:
        return {"error": "not measured: the run resumed from a checkpoint, which keeps no dense weights"}
    inputs = batches(_cpu_input(x), config.batch_sizes)
    try:
        graph = dense_onnx(onnx_path, dense_weights)
        return onnx_latency(graph, inputs, share(config, runtimes, inputs), config.max_repeats)
    except Exception as e:  # noqa: BLE001 (a graph whose initializers are not the model's weights: say why)
        return {"error": f"{type(e).__name__}: {e}"}
