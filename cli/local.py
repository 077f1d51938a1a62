"""Local runs from the command line: ``arborist prune``, ``compare`` and ``train``.

A run file (YAML) names the model, the data, where outputs go and the spec:

    model: {arch: mlp, kwargs: {in_features: 64, hidden: [64], num_classes: 10}, weights: mlp.safetensors}
    data: digits              # or a .npz / .safetensors / .parquet path
    output: runs/wf80
    spec: {method: woodfisher, sparsity: 0.8, fisher: {samples: 256, lambda: 1.0e-4}}

Relative paths are taken from the run file's folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import click
import torch
import yaml
from pydantic import ValidationError
from tqdm import tqdm

from core.errors import ArboristError
from core.io.data import Dataset, builtin_dataset, check_compatible, load_dataset
from core.io.model_files import load_model, save_state_dict
from core.io.zoo import build_model
from core.runs.checkpoint import DirectoryCheckpointer
from core.runs.onnx_job import bind_named_inputs
from core.runs.run import RunHooks, execute
from core.runs.spec import FinetuneSpec, PruneSpec
from core.runs.train import evaluate, make_optimizer, train_epoch


class BarHooks(RunHooks):
    def __init__(self, label: str):
        self.bar = tqdm(total=1000, desc=label, unit="‰", leave=False)

    def progress(self, fraction: float, message: str) -> None:
        self.bar.set_postfix_str(message)
        self.bar.n = int(fraction * 1000)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _data(ref: str, base: Path) -> Dataset:
    if ref in ("digits", "digits-image"):
        return builtin_dataset(ref)
    return load_dataset(base / ref)


def _load_run_file(path: Path) -> tuple[dict, torch.nn.Module, Dataset, PruneSpec]:
    doc = yaml.safe_load(path.read_text()) or {}
    base = path.parent
    m = doc.get("model") or {}
    if "onnx" in m:
        model = load_model(base / m["onnx"], "onnx")
    else:
        model = load_model(base / m["weights"], "safetensors", m.get("arch"), m.get("kwargs") or {})
    data = _data(str(doc.get("data", "digits")), base)
    spec = PruneSpec(**(doc.get("spec") or {}))
    model = bind_named_inputs(model, data)  # an ONNX graph of several named inputs
    check_compatible(model, data, spec.loss.value)
    doc["output"] = base / doc.get("output", f"runs/{path.stem}")
    return doc, model, data, spec


def _fail(e: Exception) -> None:
    if isinstance(e, ValidationError):
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise click.ClickException("invalid spec:\n" + "\n".join(lines))
    raise click.ClickException(getattr(e, "detail", str(e)))


@click.command("prune")
@click.argument("run_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), default=None, help="override the run file's output folder")
def prune(run_file: Path, output: Path | None) -> None:
    """Prune locally as RUN_FILE says; resumes from the output folder's checkpoint if there is one."""
    try:
        doc, model, data, spec = _load_run_file(run_file)
        out = output or doc["output"]
        hooks = BarHooks(spec.method.value)
        result = execute(spec, model, data, out, hooks, DirectoryCheckpointer(out / "checkpoint"))
        hooks.close()
    except (ArboristError, ValidationError) as e:
        _fail(e)
    r = result.report
    before, after = r["metrics"]["before"]["validation"], r["metrics"]["after"]["validation"]
    click.echo(f"{'':18}{'before':>12}{'after':>12}")
    for key in before:
        click.echo(f"{'val ' + key:18}{before[key]:>12.4f}{after[key]:>12.4f}")
    click.echo(f"{'sparsity':18}{0:>12.4f}{r['sparsity']['pruned_layers']:>12.4f}")
    click.echo(f"{'MACs':18}{r['macs']['dense']:>12}{r['macs']['sparse']:>12}")
    for kind, path in result.artifacts.items():
        click.echo(f"{kind:12} {path}")


@click.command("compare")
@click.argument("run_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--methods", default="woodfisher,global_magnitude,magnitude", show_default=True)
@click.option("--sparsities", default="0.5,0.7,0.9", show_default=True)
@click.option("--output", type=click.Path(path_type=Path), default=None)
def compare(run_file: Path, methods: str, sparsities: str, output: Path | None) -> None:
    """One-shot prune with several methods at several sparsities; print a table, write a plot."""
    try:
        doc, model, data, spec = _load_run_file(run_file)
        out = output or doc["output"] / "compare"
        state = copy.deepcopy(model.state_dict())
        levels = [float(s) for s in sparsities.split(",")]
        rows = []
        for method in methods.split(","):
            for s in levels:
                model.load_state_dict(state)
                run_spec = PruneSpec(
                    **{
                        **(doc.get("spec") or {}),  # as written: λ, R and the update default by method
                        "method": method,
                        "sparsity": s,
                        "mode": "one_shot",
                        "finetune": {"epochs": 0},
                    }
                )
                r = execute(run_spec, model, data, out / f"{method}-{s}").report
                rows.append({"method": method, "sparsity": s, spec.metric: r["curve"][-1]["metric"]})
    except (ArboristError, ValidationError) as e:
        _fail(e)
    click.echo(f"{'method':20}" + "".join(f"{s:>9.0%}" for s in levels))
    for method in methods.split(","):
        vals = [r[spec.metric] for r in rows if r["method"] == method]
        click.echo(f"{method:20}" + "".join(f"{v:>9.4f}" for v in vals))
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods.split(","):
        ax.plot(levels, [r[spec.metric] for r in rows if r["method"] == method], "o-", label=method)
    ax.set_xlabel("sparsity")
    ax.set_ylabel(spec.metric)
    ax.legend()
    fig.savefig(out / "compare.png", dpi=100)
    click.echo(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")


@click.command("train")
@click.option("--arch", required=True, help="zoo architecture, e.g. mlp, lenet5, resnet20")
@click.option("--kwargs", "kwargs_json", default="{}", help="constructor arguments as JSON")
@click.option("--data", "data_ref", default="digits", show_default=True)
@click.option("--epochs", default=20, show_default=True)
@click.option("--lr", default=1e-2, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--output", type=click.Path(path_type=Path), required=True, help="where to write the .safetensors")
def train(arch: str, kwargs_json: str, data_ref: str, epochs: int, lr: float, seed: int, output: Path) -> None:
    """Train a zoo model (for demos and benchmarks) and save its state dict as safetensors."""
    try:
        data = _data(data_ref, Path.cwd()).split(0.2, seed)
        torch.manual_seed(seed)
        model = build_model(arch, **json.loads(kwargs_json))
        check_compatible(model, data)
        opt = make_optimizer(model, FinetuneSpec(optimizer="adam", lr=lr))
        for e in tqdm(range(epochs), desc="train", leave=False):
            train_epoch(
                model,
                data.x_train,
                data.y_train,
                opt,
                loss="cross_entropy",
                batch_size=64,
                masks={},
                generator=torch.Generator().manual_seed(seed * 1000 + e),
            )
    except ArboristError as e:
        _fail(e)
    save_state_dict(model.state_dict(), output)
    click.echo(f"val {evaluate(model, data.x_val, data.y_val, 'cross_entropy')} -> {output}")


@click.command("dataset")
@click.argument("name", type=click.Choice(["digits", "digits-image"]))
@click.option("--output", type=click.Path(path_type=Path), required=True, help="the .npz to write")
def dataset(name: str, output: Path) -> None:
    """Write a built-in dataset as .npz (x, y), ready to upload."""
    import numpy as np

    data = builtin_dataset(name)
    output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(output, x=data.x_train.numpy(), y=data.y_train.numpy())
    click.echo(f"{len(data)} examples -> {output}")
