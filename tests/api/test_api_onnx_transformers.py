"""Issue #14 over HTTP, the ONNX part: an exported MiniLM classifier (pre-trained encoder cut to two layers, one
input of token ids) and a dataset of its tokenizer's ids are uploaded, pruned by magnitude and by WoodFisher
(the job run by the worker's own ``run_job``), and the pruned weights and ONNX come back. Every new op's bad
graph is a 422 problem that leaves nothing behind."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from torch import nn

from _api_testkit import assert_problem, files_under
from _hf_onnx import TokenClassifier, export, minilm, minilm_dir
from _onnx_ops import BAD_CASES, bad_model
from core.io.onnx import onnx_to_torch
from worker.runner import run_job

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

SEQ = 16
TOPICS = {
    0: ["the cat sat on the mat", "a dog chased the ball in the park", "birds sing in the morning trees"],
    1: ["stock prices fell sharply today", "the bank raised interest rates", "investors sold their shares"],
    2: ["the team won the final match", "she scored a goal in the last minute", "the coach praised his players"],
}


def _tokenized() -> tuple[np.ndarray, np.ndarray]:
    """Sentences of three topics through MiniLM's own tokenizer (``tokenizer.json``), padded with 0 to SEQ."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(minilm_dir()) / "tokenizer.json"))
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for i in range(64):
        label = i % 3
        words = " ".join(rng.choice(TOPICS[label], size=2))
        ids = tok.encode(words).ids[:SEQ]
        xs.append(ids + [0] * (SEQ - len(ids)))
        ys.append(label)
    return np.asarray(xs, dtype=np.int64), np.asarray(ys, dtype=np.int64)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[bytes, bytes, nn.Module]:
    d = tmp_path_factory.mktemp("minilm")
    net = TokenClassifier(minilm(layers=2)).eval()
    x, y = _tokenized()
    path = export(net, (torch.from_numpy(x[:4]).float(),), d / "minilm.onnx", dynamo=True)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)  # int64 token ids: the loader makes features float32, exact below 2**24
    return path.read_bytes(), buf.getvalue(), net


@pytest.fixture
def big_uploads(server, monkeypatch):
    monkeypatch.setattr(server.settings, "max_upload_bytes", 256 * 1024 * 1024)


def _created(resp) -> str:
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method, spec", [
    ("magnitude", {}),
    ("woodfisher", {"fisher": {"samples": 8, "block_size": 64, "recompute": 2}}),
])  # fmt: skip
def test_minilm_onnx_uploads_and_prunes(server, client, files, big_uploads, method, spec, tmp_path):
    if server.db != "postgresql":
        pytest.skip("a few minutes of CPU per job: run on the production database only")
    model_bytes, data_bytes, net = files
    model_id = _created(client.post("/v1/models", files={"file": ("minilm.onnx", model_bytes)}, data={"name": "m"}))
    model = client.get(f"/v1/models/{model_id}").json()
    assert model["format"] == "onnx"
    # the encoder's 12 Linear layers and the head (the pooler is not in the graph) are its parameters
    linears = [m for n, m in net.named_modules() if isinstance(m, nn.Linear) and "pooler" not in n]
    assert len(linears) == 13
    assert model["num_parameters"] == sum(p.numel() for m in linears for p in m.parameters())
    dataset_id = _created(client.post("/v1/datasets", files={"file": ("ids.npz", data_bytes)}, data={"name": "d"}))

    body = {"model_id": model_id, "dataset_id": dataset_id,
            "spec": {"method": method, "sparsity": 0.5, "device": "cpu", **spec}}  # fmt: skip
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    settings = server.settings.model_copy(update={"job_nice": 0})
    assert run_job(job_id, settings, worker="test@host:1") == "succeeded"

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded", job
    names = {a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
    assert {"pruned.safetensors", "model.onnx", "report.json"} <= names, names
    pruned = st_load(client.get(f"/v1/jobs/{job_id}/artifacts/pruned.safetensors").content)
    weights = {k: v for k, v in pruned.items() if k.endswith(".weight") and v.dim() == 2}
    assert len(weights) == len(linears)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert abs(zeros / total - 0.5) < 0.01
    # the pruned ONNX runs, with the pruned weights
    path = tmp_path / "pruned.onnx"
    path.write_bytes(client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx").content)
    again = onnx_to_torch(path).eval()
    x = torch.from_numpy(_tokenized()[0][:5]).float()
    with torch.no_grad():
        assert again(x).shape == (5, 3) and bool(torch.isfinite(again(x)).all())
    again_zeros = sum(int((m.weight == 0).sum()) for m in again.layers.values() if isinstance(m, nn.Linear))
    assert again_zeros == zeros


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_transformer_op_is_422_and_leaves_nothing(server, client, case):
    before = sorted(files_under(server.store.root))
    resp = client.post("/v1/models", files={"file": ("bad.onnx", bad_model(case).SerializeToString())},
                       data={"name": "bad"})  # fmt: skip
    body = assert_problem(resp, 422)
    assert BAD_CASES[case][2].split("(")[0] in body["detail"], body
    assert sorted(files_under(server.store.root)) == before
    assert client.get("/v1/models").json()["data"] == []
