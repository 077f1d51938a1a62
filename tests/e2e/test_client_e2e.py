"""The pipeline's view: the ``arborist`` CLI (a real process) and the Python client against the real stack.

Upload a model and a dataset, submit with ``--wait`` (progress on stderr, the final job as JSON on stdout),
download every artifact (sha256-checked) and check the pruned model; then the failure paths a pipeline relies
on: exit code 2 with the problem JSON for an API error, exit code 3 for a job that did not succeed.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from _e2e_kit import MLP_KWARGS, VENV_BIN, Api, DigitsFiles, Proc, check_pruned_model
from cli.client import ApiError, Client


def arborist(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "arborist"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def ok_json(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_cli_pipeline_and_python_client(
    api: Api,
    api_server: str,
    service_env: dict[str, str],
    digits_files: DigitsFiles,
    start_worker: Callable[[str], Proc],
    tmp_path: Path,
) -> None:
    key = api.client.headers["Authorization"].removeprefix("Bearer ")
    env = {**service_env, "ARBORIST_URL": api_server, "ARBORIST_API_KEY": key}
    model = ok_json(
        arborist(
            env,
            "models",
            "upload",
            str(digits_files.model),
            "--arch",
            "mlp",
            "--kwargs",
            json.dumps(MLP_KWARGS),
            "--name",
            "cli-mlp",
        )
    )
    data = ok_json(arborist(env, "datasets", "upload", str(digits_files.dataset)))
    assert model["arch"] == "mlp" and data["num_examples"] == len(digits_files.y)

    spec = tmp_path / "spec.yaml"
    spec.write_text("method: woodfisher\nsparsity: 0.5\nfisher: {samples: 256, lambda: 1.0e-3}\ndevice: cpu\n")
    worker = start_worker("client")
    run = arborist(
        env,
        "jobs",
        "submit",
        "--model",
        model["id"],
        "--dataset",
        data["id"],
        "--spec",
        str(spec),
        "--set",
        "sparsity=0.8",
        "--set",
        "finetune.epochs=2",
        "--wait",
    )
    job = ok_json(run)
    assert job["state"] == "succeeded" and job["result"]["sparsity"]["target"] == 0.8, job
    assert "pruned:" in run.stderr and "%  " in run.stderr, run.stderr[-2000:]  # events and progress lines

    out = tmp_path / "out"
    files = ok_json(arborist(env, "jobs", "download", job["id"], "-o", str(out)))
    assert {"pruned.safetensors", "masks.safetensors", "report.json", "curve.csv"} <= set(files)
    assert not list(out.glob(".*.part"))
    check_pruned_model((out / "pruned.safetensors").read_bytes(), digits_files)

    listed = ok_json(arborist(env, "jobs", "list", "--state", "succeeded"))
    assert job["id"] in [j["id"] for j in listed]

    # An API error: exit 2, the problem document on stderr, nothing on stdout.
    missing = arborist(env, "jobs", "get", "no-such-job")
    assert missing.returncode == 2 and missing.stdout == ""
    assert json.loads(missing.stderr)["status"] == 404

    # A job that fails (more Fisher samples than examples): --wait exits 3 with the failed job on stdout.
    too_many = arborist(
        env,
        "jobs",
        "submit",
        "--model",
        model["id"],
        "--dataset",
        data["id"],
        "--set",
        f"fisher.samples={len(digits_files.y) + 1}",
        "--set",
        "device=cpu",
        "--wait",
    )
    if too_many.returncode == 2:  # refused at submission already: also a clear answer
        assert json.loads(too_many.stderr)["status"] == 422
    else:
        assert too_many.returncode == 3, too_many.stderr[-2000:]
        failed = json.loads(too_many.stdout)
        assert failed["state"] == "failed" and failed["error"]["detail"], failed

    # The Python client: same objects, errors as ApiError with the problem attached.
    with Client(api_server, key) as client:
        assert client.job(job["id"])["state"] == "succeeded"
        assert [m["kind"] for m in client.metrics(job["id"])][:2] == ["dense", "prune"]
        first = client.submit(model["id"], data["id"], {"sparsity": 0.8}, idempotency_key="k1")
        assert client.submit(model["id"], data["id"], {"sparsity": 0.8}, idempotency_key="k1")["id"] == first["id"]
        assert client.cancel(first["id"])["state"] in {"canceling", "canceled"}
        with pytest.raises(ApiError) as err:
            client.submit(model["id"], data["id"], {"sparsity": 1.5})
        assert err.value.status == 422 and ("body", "spec", "sparsity") in {
            tuple(e["loc"]) for e in err.value.problem["errors"]
        }
    worker.stop()
