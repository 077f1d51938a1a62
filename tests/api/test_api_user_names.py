"""A user's own tensor names survive the service (#13): what goes in under the user's names comes back under them.

Through the HTTP API (real uvicorn, SQLite and PostgreSQL) and a job run by the worker's own code in-process:

* ONNX: a torch ``nn.Sequential`` MLP and a small CNN (Conv2d + BatchNorm2d + Linear, attributes ``c1``/``bn``/
  ``fc``) exported to ONNX, uploaded and pruned; ``pruned.safetensors`` loads with ``load_state_dict(strict=True)``
  into the original torch module (it came back as ``layers.0.weight``, ``layers.c1.weight`` …), and
  ``masks.safetensors`` names the same tensors.
* safetensors: a plain ``nn.Sequential`` MLP saved under its own names (``0.weight``, ``2.weight`` …) for the zoo's
  ``mlp`` (``layers.1.weight`` …) is matched by order and shape (the upload response shows the mapping) and comes
  back under its own names; a file that matches by no order is a 422 that says what the architecture takes.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from _api_testkit import assert_problem, files_under
from core.io.data import builtin_dataset
from core.io.onnx.export import export_onnx
from core.io.zoo import build_model
from worker.runner import run_job

EXAMPLES = 400  # the test server's upload cap is 256 KiB


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.c1(x))).flatten(1))


def _sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _npz(image: bool) -> bytes:
    data = builtin_dataset("digits-image" if image else "digits")
    buf = io.BytesIO()
    np.savez(buf, x=data.x_train[:EXAMPLES].numpy(), y=data.y_train[:EXAMPLES].numpy())
    return buf.getvalue()


def _prune(server, client, model_file: tuple[str, bytes], form: dict, image: bool, spec: dict) -> str:
    """Uploads the model and the data, runs a job of ``spec`` (the worker's code, in this process); its id."""
    model = client.post("/v1/models", files={"file": model_file}, data=form)
    assert model.status_code == 201, model.text
    data = client.post("/v1/datasets", files={"file": ("d.npz", _npz(image))})
    assert data.status_code == 201, data.text
    body = {"model_id": model.json()["id"], "dataset_id": data.json()["id"], "spec": {"device": "cpu", **spec}}
    job = client.post("/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    assert run_job(job_id, server.settings, worker="test@host:1") == "succeeded"
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"
    return job_id


def _download(client, job_id: str, name: str) -> dict[str, torch.Tensor]:
    resp = client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
    assert resp.status_code == 200, resp.text
    return st_load(resp.content)


@pytest.mark.parametrize("kind", ["sequential", "cnn"])
def test_an_onnx_upload_comes_back_under_the_names_of_the_users_module(server, account, tmp_path, kind):
    torch.manual_seed(0)
    module = (_sequential() if kind == "sequential" else SmallCNN()).eval()
    example = torch.zeros(1, 64) if kind == "sequential" else torch.zeros(1, 1, 8, 8)
    path = export_onnx(module, example, tmp_path / "m.onnx")
    spec = {"sparsity": 0.5, "fisher": {"samples": 32, "recompute": 2}}
    job_id = _prune(server, account.client, ("m.onnx", path.read_bytes()), {}, kind == "cnn", spec)
    pruned = _download(account.client, job_id, "pruned.safetensors")
    assert set(pruned) == set(module.state_dict())  # 0.weight …, c1.weight …, bn.running_mean …
    original = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(pruned, strict=True)  # no renaming needed
    masks = _download(account.client, job_id, "masks.safetensors")
    assert masks and set(masks) <= set(pruned)
    for name, mask in masks.items():
        assert mask.shape == pruned[name].shape and torch.all(pruned[name][mask == 0] == 0)
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    assert zeros == round(0.5 * sum(m.numel() for m in masks.values()))  # a global threshold: half of them
    unpruned = [k for k in pruned if k not in masks and k.endswith("running_var")]
    for name in unpruned:  # BatchNorm statistics: the ones the user exported
        assert torch.equal(pruned[name], original[name])
    layers = account.client.get(f"/v1/jobs/{job_id}/artifacts/report.json").json()["layers"]
    assert {layer["saved_as"] for layer in layers} == set(masks)


MLP = {"in_features": 64, "hidden": [32], "num_classes": 10}


def _safetensors(module: nn.Module) -> bytes:
    return st_save({k: v.contiguous() for k, v in module.state_dict().items()})


def test_a_sequentials_own_names_are_matched_to_the_mlp_by_order_and_shape(server, account):
    torch.manual_seed(0)
    module = _sequential()
    form = {"arch": "mlp", "arch_kwargs": json.dumps(MLP)}
    resp = account.client.post("/v1/models", files={"file": ("seq.safetensors", _safetensors(module))}, data=form)
    assert resp.status_code == 201, resp.text
    assert resp.json()["tensor_names"] == {
        "0.weight": "layers.1.weight",
        "0.bias": "layers.1.bias",
        "2.weight": "layers.3.weight",
        "2.bias": "layers.3.bias",
    }
    spec = {"sparsity": 0.5, "fisher": {"samples": 32, "recompute": 2}}
    job_id = _prune(server, account.client, ("seq.safetensors", _safetensors(module)), form, False, spec)
    pruned = _download(account.client, job_id, "pruned.safetensors")
    module.load_state_dict(pruned, strict=True)  # back under the user's names
    assert set(_download(account.client, job_id, "masks.safetensors")) == {"0.weight", "2.weight"}
    # a file under the architecture's own names shows no mapping
    own = build_model("mlp", **MLP)
    ok = account.client.post("/v1/models", files={"file": ("own.safetensors", _safetensors(own))}, data=form)
    assert ok.status_code == 201 and ok.json()["tensor_names"] is None


@pytest.mark.parametrize(
    "module",
    [
        nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)),  # another hidden width: no match by shape
        nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), nn.ReLU(), nn.Linear(10, 10)),  # more layers
        nn.ModuleDict({"fc1": nn.Linear(64, 32), "fc2": nn.Linear(32, 10)}),  # named, not an order: never guessed
    ],
    ids=["width", "depth", "named"],
)
def test_a_file_that_matches_by_no_order_is_a_422_that_says_what_would_work(server, account, module):
    form = {"arch": "mlp", "arch_kwargs": json.dumps(MLP)}
    before = files_under(server.settings.artifact_root)
    resp = account.client.post("/v1/models", files={"file": ("m.safetensors", _safetensors(module))}, data=form)
    body = assert_problem(resp, 422, "invalid-input")
    assert "layers.1.weight [32, 64]" in body["detail"] and "nn.Sequential" in body["detail"]
    assert "matched by order" in body["detail"]
    assert {e["type"] for e in body["errors"]} >= {"missing_key"}
    assert files_under(server.settings.artifact_root) == before  # nothing stored
