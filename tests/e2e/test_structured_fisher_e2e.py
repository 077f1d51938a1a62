"""Structured WoodFisher through the HTTP API (issue #17): an OBS neurons job scored on the consumer's Fisher blocks,
with global allocation, returns a smaller model that loads as is; a global allocation without a structure is a 422.

The zoo MLP of the digits files (64 → 32 → 10, one family) through ``arborist serve`` (API + embedded worker).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from _e2e_kit import MLP_KWARGS, Api, DigitsFiles
from test_serve_e2e import ServeFactory, _client, start_serve  # noqa: F401 (the fixture, shared)


def test_structured_woodfisher_job_returns_a_smaller_model_that_loads_as_is(
    start_serve: ServeFactory,  # noqa: F811 (the imported fixture)
    digits_files: DigitsFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from core.io.zoo import build_model

    data_dir: Path = tmp_path_factory.mktemp("serve-structured-fisher")
    base, proc = start_serve(data_dir)
    client, _ = _client(base, data_dir)
    with client:
        api = Api(client, proc.describe)
        model_id, dataset_id = api.upload(digits_files)
        ids = {"model_id": model_id, "dataset_id": dataset_id}
        bad = client.post("/v1/jobs", json={**ids, "spec": {"sparsity": 0.5, "structure_allocation": "global"}})
        assert bad.status_code == 422 and "structure_allocation" in bad.text, bad.text
        spec = {
            "method": "woodfisher",
            "sparsity": 0.5,
            "structure": "neurons",
            "structure_allocation": "global",
            "fisher": {"samples": 256},
            "device": "cpu",
        }
        job = api.submit(model_id, dataset_id, spec)
        done = api.wait_state(job["id"], {"succeeded", "failed"}, timeout=300)
        assert done["state"] == "succeeded", done
        report = json.loads(api.download(job["id"], "report.json"))
        st = report["structure"]
        assert st["saliency"] == "fisher" and st["allocation"]["counts"] == [16]  # one family: global = uniform
        assert st["arch_kwargs"] == {"hidden": [16]} and "one block per row" in report["memory_plan"]["block_choice"]
        model = build_model("mlp", **{**MLP_KWARGS, **st["arch_kwargs"]}).eval()
        model.load_state_dict(load(api.download(job["id"], "pruned.safetensors")), strict=True)
        with torch.no_grad():
            accuracy = float((model(digits_files.x).argmax(-1) == digits_files.y).float().mean())
        assert accuracy >= 0.8, accuracy
