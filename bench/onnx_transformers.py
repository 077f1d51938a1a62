"""Imported transformer ONNX graphs (issue #14): MiniLM-L6 (pre-trained, dynamo and TorchScript exports) run by
our importer's module against the same model in PyTorch and in onnxruntime, and its per-example gradients
against the PyTorch model's.

Prints, from one run: the conversion time, and the ratios of forward time (batch 8 × 64 tokens, padded) and of
vmap(grad) time (8 examples of 32 tokens) to a per-example backward loop of the PyTorch model (which vmap cannot
trace: transformers' mask code branches on the data), each the minimum over repeats.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _hf_onnx import IdsAndMask, batch, export, minilm
from bench._util import save, timeit
from core.io.onnx import onnx_to_torch


def per_example_grads(model, ids, mask):
    """vmap(grad) of a loss over the Linear weights (what the Fisher samples are taken of), one example each."""
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    params = {n: p.detach() for n, p in model.named_parameters() if n in linear}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in linear} | dict(model.named_buffers())

    def loss(p, i, m):
        return functional_call(model, (p, rest), (i, m)).square().mean()

    return lambda: vmap(grad(loss), in_dims=(None, 0, 0))(params, ids.unsqueeze(1), mask.unsqueeze(1))


def looped_grads(model, ids, mask):
    """The same gradients one example at a time: what the PyTorch model needs (transformers' mask code branches
    on the data, which vmap cannot trace)."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]

    def run():
        return [
            torch.autograd.grad(model(i[None], m[None]).square().mean(), weights, allow_unused=True)
            for i, m in zip(ids, mask)
        ]

    return run


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    ref = IdsAndMask(minilm()).eval()
    ids, mask = batch(8, 64, vocab=30000)
    gids, gmask = batch(8, 32, seed=1, vocab=30000)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for exporter in ("dynamo", "torchscript"):
            path = export(ref, batch(2, 8), Path(d) / f"{exporter}.onnx", dynamo=exporter == "dynamo")
            t = time.perf_counter()
            ours = onnx_to_torch(path).eval()
            convert = time.perf_counter() - t
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feeds = dict(zip([i.name for i in session.get_inputs()], [ids.numpy(), mask.numpy()]))
            with torch.no_grad():
                t_ours, t_torch = timeit(lambda m=ours: m(ids, mask), 5), timeit(lambda: ref(ids, mask), 5)
                err = float((ours(ids, mask) - ref(ids, mask)).abs().max())
            t_ort = timeit(lambda s=session, f=feeds: s.run(None, f), 5)
            g_ours, g_torch = (
                timeit(per_example_grads(ours, gids, gmask), 3),
                timeit(looped_grads(ref, gids, gmask), 3),
            )
            row = {
                "exporter": exporter,
                "convert_s": round(convert, 2),
                "forward_ours_over_torch": round(t_ours / t_torch, 2),
                "forward_ours_over_ort": round(t_ours / t_ort, 2),
                "vmap_grad_ours_over_torch_loop": round(g_ours / g_torch, 2),
                "max_abs_error": err,
                "linear_parameters": sum(p.numel() for p in ours.parameters()),
            }
            print(row, flush=True)
            rows.append(row)
    save("onnx_transformers", rows)


if __name__ == "__main__":
    main()
