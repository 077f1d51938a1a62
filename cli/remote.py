"""``arborist models|datasets|jobs``: the service from a shell or a pipeline step.

Every command prints the API's JSON (one document on stdout, errors as the RFC 9457 problem on stderr with a
non-zero exit), so a pipeline can ``jq`` it. The server and key come from ``--url``/``--key`` or
``ARBORIST_URL``/``ARBORIST_API_KEY``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
import yaml

from cli.client import ApiError, Client

EXIT_API_ERROR = 2
EXIT_JOB_NOT_SUCCEEDED = 3


def _connection(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds ``--url``/``--key``, opens a Client, prints the JSON result, maps ApiError to exit code 2."""

    @click.option("--url", envvar="ARBORIST_URL", default="http://127.0.0.1:8000", show_default=True)
    @click.option("--key", envvar="ARBORIST_API_KEY", required=True, help="API key (or ARBORIST_API_KEY)")
    @wraps(fn)
    def wrapper(url: str, key: str, **kwargs: Any) -> None:
        try:
            with Client(url, key) as client:
                result = fn(client, **kwargs)
        except ApiError as exc:
            click.echo(json.dumps(exc.problem, indent=2), err=True)
            sys.exit(EXIT_API_ERROR)
        if result is not None:
            click.echo(json.dumps(result, indent=2, default=str))

    return wrapper


def _json_arg(value: str | None) -> dict[str, Any] | None:
    return None if value is None else json.loads(value)


@click.group()
def models() -> None:
    """Upload, list, show and delete models."""


@models.command("upload")
@click.argument("path", type=click.Path(exists=True))
@click.option("--arch", help="zoo architecture for a safetensors state dict (ONNX needs none)")
@click.option("--kwargs", "arch_kwargs", help="the architecture's constructor arguments, as JSON")
@click.option("--name")
@_connection
def models_upload(client: Client, path: str, arch: str | None, arch_kwargs: str | None, name: str | None) -> Any:
    """Upload a safetensors state dict (with --arch), an ONNX file, or a Hugging Face model folder (zipped for you)
    or its .zip / .tar.gz."""
    return client.upload_model(path, arch=arch, arch_kwargs=_json_arg(arch_kwargs), name=name)


@models.command("list")
@_connection
def models_list(client: Client) -> Any:
    """List this tenant's models."""
    return list(client.models())


@models.command("get")
@click.argument("model_id")
@_connection
def models_get(client: Client, model_id: str) -> Any:
    """Show one model."""
    return client.model(model_id)


@models.command("delete")
@click.argument("model_id")
@_connection
def models_delete(client: Client, model_id: str) -> Any:
    """Delete a model (refused while a job uses it)."""
    client.delete_model(model_id)
    return {"deleted": model_id}


@click.group()
def datasets() -> None:
    """Upload or register, list, show and delete datasets."""


@datasets.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name")
@click.option("--format", "fmt", help="npz | safetensors | parquet (default: detected)")
@_connection
def datasets_upload(client: Client, path: str, name: str | None, fmt: str | None) -> Any:
    """Upload an .npz, safetensors or parquet dataset."""
    return client.upload_dataset(path, name=name, format=fmt)


@datasets.command("register")
@click.argument("uri")
@click.option("--name")
@click.option("--format", "fmt")
@_connection
def datasets_register(client: Client, uri: str, name: str | None, fmt: str | None) -> Any:
    """Register a dataset by URI under the server's allowed roots."""
    return client.register_dataset(uri, name=name, format=fmt)


@datasets.command("list")
@_connection
def datasets_list(client: Client) -> Any:
    """List this tenant's datasets."""
    return list(client.datasets())


@click.group()
def jobs() -> None:
    """Submit, follow, cancel and retry pruning jobs; download their outputs."""


@jobs.command("submit")
@click.option("--model", "model_id", required=True)
@click.option("--dataset", "dataset_id", required=True)
@click.option("--spec", "spec_file", type=click.Path(exists=True, dir_okay=False), help="spec as YAML or JSON")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="spec field (dotted, value as YAML), e.g. --set sparsity=0.9 --set fisher.lambda=1e-4",
)
@click.option("--idempotency-key")
@click.option("--priority", type=int, default=None, help="within your jobs, higher starts first (-100..100)")
@click.option("--wait", is_flag=True, help="follow the job to the end (exit 3 unless it succeeds)")
@_connection
def jobs_submit(
    client: Client,
    model_id: str,
    dataset_id: str,
    spec_file: str | None,
    overrides: tuple[str, ...],
    idempotency_key: str | None,
    priority: int | None,
    wait: bool,
) -> Any:
    """Submit a pruning job (spec from a file and/or --set)."""
    spec = yaml.safe_load(Path(spec_file).read_text()) if spec_file else {}
    spec = spec.get("spec", spec) if isinstance(spec, dict) else {}
    for item in overrides:
        key, _, value = item.partition("=")
        node = spec
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    job = client.submit(model_id, dataset_id, spec, idempotency_key=idempotency_key, priority=priority)
    return _follow(client, job["id"]) if wait else job


@jobs.command("get")
@click.argument("job_id")
@_connection
def jobs_get(client: Client, job_id: str) -> Any:
    """Show a job: state, progress, result or error."""
    return client.job(job_id)


@jobs.command("list")
@click.option("--state", type=click.Choice(["queued", "running", "succeeded", "failed", "canceling", "canceled"]))
@_connection
def jobs_list(client: Client, state: str | None) -> Any:
    """List jobs, newest first."""
    return list(client.jobs(state))


@jobs.command("wait")
@click.argument("job_id")
@_connection
def jobs_wait(client: Client, job_id: str) -> Any:
    """Follow the event stream (progress on stderr) until the job ends; exit 3 unless it succeeded."""
    return _follow(client, job_id)


@jobs.command("cancel")
@click.argument("job_id")
@_connection
def jobs_cancel(client: Client, job_id: str) -> Any:
    """Ask a job to stop; it ends canceled with its checkpoint kept."""
    return client.cancel(job_id)


@jobs.command("retry")
@click.argument("job_id")
@_connection
def jobs_retry(client: Client, job_id: str) -> Any:
    """Start a failed or canceled job again from its last checkpoint."""
    return client.retry(job_id)


@jobs.command("metrics")
@click.argument("job_id")
@_connection
def jobs_metrics(client: Client, job_id: str) -> Any:
    """The job's sparsity/loss/metric curve."""
    return client.metrics(job_id)


@jobs.command("download")
@click.argument("job_id")
@click.option("--name", "names", multiple=True, help="artifact name (repeatable); default: all of them")
@click.option("--output", "-o", type=click.Path(file_okay=False), default=".", show_default=True)
@_connection
def jobs_download(client: Client, job_id: str, names: tuple[str, ...], output: str) -> Any:
    """Download artifacts (checked against their sha256)."""
    Path(output).mkdir(parents=True, exist_ok=True)
    wanted = names or tuple(a["name"] for a in client.artifacts(job_id))
    return {name: str(client.download(job_id, name, output)) for name in wanted}


def _follow(client: Client, job_id: str) -> dict[str, Any]:
    def show(kind: str, data: dict[str, Any]) -> None:
        payload = data.get("data", {})
        if kind == "progress":
            click.echo(f"{payload.get('progress', 0):6.1%}  {payload.get('message', '')}", err=True)
        elif kind != "end":
            click.echo(f"{kind}: {json.dumps(payload)[:200]}", err=True)

    job = client.wait(job_id, on_event=show)
    if job["state"] != "succeeded":
        click.echo(json.dumps(job, indent=2, default=str))
        sys.exit(EXIT_JOB_NOT_SUCCEEDED)
    return job
