"""The layer-wise methods through the HTTP API: ``arborist serve`` (API + embedded worker), one job per method,
each with a pattern; the report says the pattern holds, and the pruned weights load into the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from _e2e_kit import Api, DigitsFiles, check_pruned_model
from test_serve_e2e import ServeFactory, _client, start_serve  # noqa: F401 (the fixture, shared)

JOBS = {
    "sparsegpt": {"pattern": "2:4"},
    "obc": {"sparsity": 0.5},
    "wanda": {"sparsity": 0.5, "pattern": "4:8"},
}


def test_one_job_per_layerwise_method_through_the_api(
    start_serve: ServeFactory,  # noqa: F811 (the imported fixture)
    digits_files: DigitsFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir: Path = tmp_path_factory.mktemp("serve-layerwise")
    base, proc = start_serve(data_dir)
    client, _ = _client(base, data_dir)
    with client:
        api = Api(client, proc.describe)
        model_id, dataset_id = api.upload(digits_files)
        bad = client.post(
            "/v1/jobs",
            json={"model_id": model_id, "dataset_id": dataset_id, "spec": {"method": "sparsegpt", "pattern": "1:3"}},
        )
        assert bad.status_code == 422 and "pattern 1:3 does not fit" in bad.text, bad.text  # 64 inputs, 3 ∤ 64
        conflict = client.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "dataset_id": dataset_id,
                "spec": {"method": "sparsegpt", "pattern": "2:4", "sparsity": 0.7},
            },
        )
        assert conflict.status_code == 422 and "fixes sparsity at 0.5" in conflict.text, conflict.text
        jobs = {
            method: api.submit(model_id, dataset_id, {"method": method, "fisher": {"samples": 256}, **extra})
            for method, extra in JOBS.items()
        }
        for method, job in jobs.items():
            done = api.wait_state(job["id"], {"succeeded", "failed"}, timeout=300)
            assert done["state"] == "succeeded", done
            report = json.loads(api.download(job["id"], "report.json"))
            pattern = JOBS[method].get("pattern", "unstructured")
            assert report["method"] == method and report["lambda"] is None
            assert report["pattern"] == {"pattern": pattern, "holds": True, "layers_checked": 2}
            blob = api.download(job["id"], "pruned.safetensors")
            check_pruned_model(blob, digits_files, sparsity=0.5, min_accuracy=0.8)
            if pattern != "unstructured":  # N:M in the downloaded weights themselves
                n, m = map(int, pattern.split(":"))
                for name, w in load(blob).items():
                    if name.endswith("weight"):
                        assert torch.all((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n)
