"""Hugging Face model archives over HTTP (a real uvicorn server, SQLite and PostgreSQL): a tiny model's zip and
.tar.gz are registered with what was detected, a text dataset is registered as text; every refused archive is a
problem+json (4xx) and leaves nothing behind (no row, no file in the artifact store or the temporary directory)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from _api_testkit import assert_problem, files_under
from _hf_models import folder_entries, jsonl, sentences, tar_folder, write_model, zip_bytes, zip_folder
from core.service.db.tables import Dataset, Model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("hf") / "bert_cls", "bert_cls")


def _upload(client: httpx.Client, name: str, blob: bytes) -> httpx.Response:
    return client.post("/v1/models", files={"file": (name, blob, "application/octet-stream")}, timeout=300)


def _state(server) -> tuple[dict, set[str], set[str]]:
    with server.session() as s:
        rows = {t.__tablename__: s.scalar(select(func.count()).select_from(t)) for t in (Model, Dataset)}
    files = {str(p) for p in files_under(Path(server.settings.artifact_root))}
    tmp = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("arborist-hf-")}
    return rows, files, tmp


def test_hf_zip_and_tar_are_registered_with_what_was_detected(client: httpx.Client, tiny: Path, tmp_path: Path) -> None:
    for path in (zip_folder(tiny, tmp_path / "m.zip"), tar_folder(tiny, tmp_path / "m.tar.gz")):
        r = _upload(client, path.name, path.read_bytes())
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["format"] == "huggingface" and body["arch"] == "BertForSequenceClassification"
        details = body["arch_kwargs"]
        assert details["head"] == "sequence_classification" and details["num_labels"] == 3
        assert details["model_type"] == "bert" and details["tokenizer"] == "tokenizer.json"
        assert body["num_parameters"] > 0
    texts = sentences(5)
    r = client.post(
        "/v1/datasets",
        files={
            "file": ("s.jsonl", jsonl([{"text": t, "label": i % 3} for i, t in enumerate(texts)]), "application/json")
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "jsonl" and r.json()["num_examples"] == 5 and r.json()["num_classes"] == 3


def _bad_archives(tiny: Path) -> list[tuple[str, bytes, int, str]]:
    good = folder_entries(tiny)
    config = json.loads(good["config.json"])

    def cfg(**kv) -> bytes:
        return json.dumps({**config, **kv}).encode()

    no_weights = {k: v for k, v in good.items() if k != "model.safetensors"}
    index = {"weight_map": {"bert.embeddings.word_embeddings.weight": "../../model.safetensors"}}
    return [
        ("bin-only", zip_bytes(no_weights | {"pytorch_model.bin": pickle.dumps({"w": 1})}), 415, "pytorch_model.bin"),
        ("auto-map", zip_bytes(good | {"config.json": cfg(auto_map={"AutoModel": "m.M"})}), 415, "auto_map"),
        ("unknown-type", zip_bytes(good | {"config.json": cfg(model_type="nope")}), 422, "does not know"),
        ("pickle-tokenizer", zip_bytes(good | {"tokenizer.json": pickle.dumps({"a": 1})}), 415, "pickle"),
        ("zip-slip", zip_bytes(good | {"../../escape.txt": b"x"}), 415, r"'\.\.'"),
        (
            "shard-outside",
            zip_bytes(no_weights | {"model.safetensors.index.json": json.dumps(index).encode()}),
            415,
            "shard",
        ),
        (
            "sizes-mismatch",
            zip_bytes(good | {"config.json": cfg(hidden_size=32, intermediate_size=64)}),
            422,
            "do not match",
        ),
    ]


def test_refused_archives_are_problems_and_leave_nothing(client: httpx.Client, server, tiny: Path) -> None:
    for name, blob, status, detail in _bad_archives(tiny):
        before = _state(server)
        body = assert_problem(_upload(client, f"{name}.zip", blob), status)
        assert re.search(detail, body["detail"]), (name, body)
        assert _state(server) == before, f"{name}: something was left behind"


def test_jobs_pair_text_datasets_with_hf_models_only(client: httpx.Client, seed, tiny: Path, tmp_path: Path) -> None:
    """A Hugging Face model with a numeric dataset, or a zoo model with a text dataset: 422 at job creation."""
    mlp, npz = seed()
    hf = _upload(client, "m.zip", zip_folder(tiny, tmp_path / "m.zip").read_bytes()).json()["id"]
    text = client.post("/v1/datasets", files={"file": ("t.txt", b"one line\nanother line\n", "text/plain")}).json()
    assert text["format"] == "txt"
    for model_id, dataset_id, detail in ((hf, npz, "runs on a text dataset"), (mlp, text["id"], "needs a Hugging")):
        r = client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}})
        body = assert_problem(r, 422)
        assert detail in body["detail"] and ["body", "dataset_id"] in [e["loc"] for e in body["errors"]], body
    r = client.post("/v1/jobs", json={"model_id": hf, "dataset_id": text["id"], "spec": {"sparsity": 0.5}})
    assert r.status_code == 202, r.text


def test_hf_folder_registered_by_uri_under_the_allowed_roots(client: httpx.Client, server, tiny: Path) -> None:
    """A folder under the data roots is registered like an upload; one with a symbolic link, or outside the roots,
    is refused and leaves nothing."""
    root = Path(server.settings.data_allowed_roots[0])
    folder = root / f"model-{os.urandom(4).hex()}"
    shutil.copytree(tiny, folder)
    r = client.post("/v1/models", json={"uri": folder.as_uri()}, timeout=300)
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "huggingface" and r.json()["arch_kwargs"]["head"] == "sequence_classification"
    (folder / "vocab.txt").symlink_to("/etc/passwd")
    before = _state(server)
    body = assert_problem(client.post("/v1/models", json={"uri": str(folder)}, timeout=300), 415)
    assert "symbolic link" in body["detail"]
    assert_problem(client.post("/v1/models", json={"uri": str(tiny)}), 403)
    assert _state(server) == before


def test_onnx_models_take_pre_tokenized_jsonl_only(client: httpx.Client, tmp_path: Path) -> None:
    """An ONNX upload has no tokenizer: with a .txt dataset a job is a 422 at creation that says so; with a .jsonl
    of input_ids (pre-tokenized) it is accepted (the worker packs the named inputs, core.runs.onnx_job)."""
    import numpy as np

    from _onnx_ops import graph, node

    ids = np.zeros((2, 3), np.int64)
    proto = graph([node("Add", ["input_ids", "attention_mask"])], {"input_ids": ids, "attention_mask": ids})
    onnx_id = _upload(client, "m.onnx", proto.SerializeToString()).json()["id"]
    text = client.post("/v1/datasets", files={"file": ("t.txt", b"one line\nanother line\n", "text/plain")}).json()
    rows = jsonl([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}, {"input_ids": [4, 5]}])
    tokens = client.post("/v1/datasets", files={"file": ("t.jsonl", rows, "application/jsonl")}).json()
    assert tokens["format"] == "jsonl", tokens
    r = client.post("/v1/jobs", json={"model_id": onnx_id, "dataset_id": text["id"], "spec": {"sparsity": 0.5}})
    body = assert_problem(r, 422)
    assert "ONNX model has no tokenizer" in body["detail"] and ["body", "dataset_id"] in [
        e["loc"] for e in body["errors"]
    ]
    r = client.post("/v1/jobs", json={"model_id": onnx_id, "dataset_id": tokens["id"], "spec": {"sparsity": 0.5}})
    assert r.status_code == 202, r.text
