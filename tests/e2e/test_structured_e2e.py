"""Done-when of issue #17 (part A) through the HTTP API: a structured job returns a smaller model that loads as is.

The zoo MLP of the digits files (64 → 32 → 10) through ``arborist serve`` (API + embedded worker): a structure the
model lacks is a 422 naming what it supports; an OBS neurons job removes half the hidden units, and the downloaded
``pruned.safetensors`` loads strictly into ``build_model("mlp", **arch_kwargs merged with the report's)``, with its
accuracy. all-MiniLM-L6-v2 through the Celery ``hf`` worker: half of every layer's FFN units removed, and the
downloaded ``hf_model.zip`` loads with ``AutoModel.from_pretrained`` and ``SentenceTransformer`` unchanged. A tiny
grouped-query Llama through the same worker: half of every layer's key/value groups removed, and the downloaded
``hf_model.zip`` loads with ``AutoModelForCausalLM.from_pretrained`` (fewer heads, ``head_dim`` explicit); a tiny
GPT-2's heads are a 422 naming the model types that take heads.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from _e2e_kit import MLP_KWARGS, Api, DigitsFiles, Proc
from _hf_models import jsonl, minilm_dir, sentences, write_model, zip_folder
from test_serve_e2e import ServeFactory, _client, start_serve  # noqa: F401 (the fixture, shared)


def test_structured_mlp_job_returns_a_smaller_model_that_loads_as_is(
    start_serve: ServeFactory,  # noqa: F811 (the imported fixture)
    digits_files: DigitsFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from core.io.zoo import build_model

    data_dir: Path = tmp_path_factory.mktemp("serve-structured")
    base, proc = start_serve(data_dir)
    client, _ = _client(base, data_dir)
    with client:
        api = Api(client, proc.describe)
        model_id, dataset_id = api.upload(digits_files)
        bad = client.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "dataset_id": dataset_id,
                "spec": {"method": "obc", "sparsity": 0.5, "structure": "channels"},
            },
        )
        assert bad.status_code == 422 and "supports: neurons" in bad.text, bad.text
        assert bad.headers["content-type"].startswith("application/problem+json")
        spec = {"method": "obc", "sparsity": 0.5, "structure": "neurons", "fisher": {"samples": 256}, "device": "cpu"}
        job = api.submit(model_id, dataset_id, spec)
        done = api.wait_state(job["id"], {"succeeded", "failed"}, timeout=300)
        assert done["state"] == "succeeded", done
        assert done["result"]["structure"]["arch_kwargs"] == {"hidden": [16]}
        report = json.loads(api.download(job["id"], "report.json"))
        assert report["structure"]["groups_removed"] == 16 and report["parameters"]["total"] < 64 * 32 + 32 * 10
        pruned_bytes = api.download(job["id"], "pruned.safetensors")
        state = load(pruned_bytes)
        assert report["size"]["pruned_safetensors_bytes"] == len(pruned_bytes)  # measured latency and size
        assert report["size"]["pruned_to_dense"] < 1 and report["speed"]["runtimes"]["torch_cpu"]["speedup"]
        model = build_model("mlp", **{**MLP_KWARGS, **report["structure"]["arch_kwargs"]}).eval()
        model.load_state_dict(state, strict=True)  # no masks, no custom code: the constructor with new widths
        assert model.layers[1].weight.shape == (16, 64) and model.layers[3].weight.shape == (10, 16)
        with torch.no_grad():
            accuracy = float((model(digits_files.x).argmax(-1) == digits_files.y).float().mean())
        assert accuracy >= 0.8, accuracy


@pytest.mark.timeout(900)
def test_structured_minilm_ffn_job_loads_with_from_pretrained(
    api: Api, start_worker: Callable[[str], Proc], tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    start_worker("hf")
    texts = sentences(40, seed=7)
    with open(zip_folder(minilm_dir(), tmp_path / "minilm.zip"), "rb") as fh:
        r = api.client.post("/v1/models", files={"file": ("minilm.zip", fh, "application/zip")}, timeout=300)
    assert r.status_code == 201, r.text
    d = api.client.post(
        "/v1/datasets", files={"file": ("text.jsonl", jsonl([{"text": t} for t in texts]), "application/json")}
    )
    assert d.status_code == 201, d.text
    heads = api.client.post(
        "/v1/jobs",
        json={
            "model_id": r.json()["id"],
            "dataset_id": d.json()["id"],
            "spec": {"method": "obc", "sparsity": 0.5, "structure": "heads"},
        },
    )
    assert heads.status_code == 422 and "pruned_heads" in heads.text, heads.text
    spec = {
        "method": "obc",
        "sparsity": 0.5,
        "structure": "neurons",
        "fisher": {"samples": 16},
        "text": {"max_length": 16},
        "export": {"onnx": False},  # MiniLM's ONNX export (dense and pruned) is minutes of CPU: tested on small models
    }
    job = api.submit(r.json()["id"], d.json()["id"], spec)
    done = api.wait_state(job["id"], {"succeeded", "failed"}, timeout=600)
    assert done["state"] == "succeeded", json.dumps(done)[:3000]
    assert done["result"]["structure"]["hf_config"] == {"intermediate_size": 768}
    out = tmp_path / "out"
    zipfile.ZipFile(io.BytesIO(api.download(job["id"], "hf_model.zip"))).extractall(out)
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 768 and "quantization_config" not in config
    loaded = AutoModel.from_pretrained(out)
    assert loaded.encoder.layer[0].intermediate.dense.weight.shape == (768, 384)
    dense = SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts[:8], convert_to_tensor=True)
    small = SentenceTransformer(str(out), device="cpu").encode(texts[:8], convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(dense, small).mean()
    assert 0.5 < float(cosine) <= 1.0, float(cosine)


@pytest.mark.timeout(600)
def test_structured_llama_heads_job_loads_with_from_pretrained(
    api: Api, start_worker: Callable[[str], Proc], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    start_worker("hf")
    d = api.client.post(
        "/v1/datasets", files={"file": ("text.jsonl", jsonl([{"text": t} for t in sentences(24)]), "application/json")}
    )
    assert d.status_code == 201, d.text
    ids = {}
    for kind in ("gpt2", "llama_gqa"):
        with open(zip_folder(write_model(tmp_path / kind, kind), tmp_path / f"{kind}.zip"), "rb") as fh:
            r = api.client.post("/v1/models", files={"file": (f"{kind}.zip", fh, "application/zip")}, timeout=300)
        assert r.status_code == 201, r.text
        ids[kind] = r.json()["id"]
    spec = {"method": "obc", "sparsity": 0.5, "structure": "heads", "fisher": {"samples": 8}}
    spec["text"] = {"max_length": 16}
    refused = api.client.post("/v1/jobs", json={"model_id": ids["gpt2"], "dataset_id": d.json()["id"], "spec": spec})
    assert refused.status_code == 422 and "model_type llama, mistral, qwen2" in refused.text, refused.text
    assert refused.json()["errors"][0]["loc"] == ["body", "spec", "structure"]
    job = api.submit(ids["llama_gqa"], d.json()["id"], spec)
    done = api.wait_state(job["id"], {"succeeded", "failed"}, timeout=500)
    assert done["state"] == "succeeded", json.dumps(done)[:3000]
    expected = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 6}
    assert done["result"]["structure"]["hf_config"] == expected
    out = tmp_path / "out"
    zipfile.ZipFile(io.BytesIO(api.download(job["id"], "hf_model.zip"))).extractall(out)
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in expected} == expected and config["hidden_size"] == 16
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    attn = loaded.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (12, 16) and attn.k_proj.weight.shape == (6, 16)
    assert attn.o_proj.weight.shape == (16, 12)
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
