"""Schemathesis over the OpenAPI document with every check and every phase (examples, coverage, fuzzing, stateful),
against the live server on SQLite and PostgreSQL, bounded in time: no 5xx, and the document tells the truth.

The run is ``schemathesis run`` itself (its stateful phase and its run-level checks exist only there), from a
config written per run: the fuzzing tenant's key, and dictionaries of real ids so that operations on existing
resources are reached (a model and a dataset uploaded for real, and a finished job with events, metrics and one
artifact of every media type the API sends). One allowance, narrower than it looks: ``positive_data_acceptance``
takes a 422 on uploads and job creation, since whether a file is a model, or whether a job's model exists and fits
its data, is not something a schema can say. Those 422s are ``invalid-input``; a schema-valid request refused as
*malformed* (``validation-error``) for a constraint a schema states fails everywhere
(``_schemathesis_hooks.document_describes_requests``). Tenancy is proven in ``test_api_tenancy.py``.

On failure the assertion message holds schemathesis' report: each failure with the curl line that reproduces it.
A second test checks deterministically what the run reaches by chance: the artifact media types and the event
stream's item schema against what is sent.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import jsonschema_rs
import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from core.service.artifacts import artifact_key, artifact_media_type
from core.service.db import attempts, outputs
from core.service.db.tables import JobState

MAX_TIME_S = 20  # per stack: fuzzing and stateful testing repeat until it is spent
PHASES = ("examples", "coverage", "fuzzing", "stateful")
HOOKS = Path(__file__).with_name("_schemathesis_hooks.py")
MLP = {"in_features": 64, "hidden": [32], "num_classes": 10}
ARTIFACTS = [
    "report.json",
    "curve.csv",
    "curve.png",
    "quadratic.png",
    "lambda_sweep.png",
    "pruned.safetensors",
    "masks.safetensors",
    "model.onnx",
]
#: where validity depends on file contents or on stored rows: a 422 (invalid-input) is an answer, not a lie
CONTENT_DEPENDENT = [("POST", "/v1/models"), ("POST", "/v1/datasets"), ("POST", "/v1/jobs"), ("POST", "/v1/jobs/plan")]
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "413", "415", "422", "429"]


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = (1).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")
    )


def _artifact_bytes(name: str) -> bytes:
    if name.endswith(".json"):
        return json.dumps({"sparsity": 0.5, "metric": {"before": 0.9, "after": 0.88}}).encode()
    if name.endswith(".csv"):
        return b"step,sparsity,metric\n0,0.0,0.9\n1,0.5,0.88\n"
    if name.endswith(".png"):
        return _png()
    return bytes(range(256)) * 4


def _upload_files() -> tuple[bytes, bytes]:
    """A 64-32-10 MLP's weights and 600 examples of 64 features in 10 classes (they fit each other)."""
    from core.io.zoo import build_model

    torch.manual_seed(0)
    model = build_model("mlp", **MLP)
    weights = st_save({k: v.contiguous() for k, v in model.state_dict().items()})
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, x=rng.standard_normal((600, 64)).astype(np.float32), y=rng.integers(0, 10, 600))
    return weights, buf.getvalue()


def _seed(server, account) -> dict[str, list[str]]:
    """The tenant's resources for the run to reach (real uploads: the validator is warm too): ids by kind, as the
    config's dictionaries. A job that succeeded has events, metrics and one artifact of each media type."""
    client, store = account.client, server.store
    weights, data = _upload_files()
    model = client.post(
        "/v1/models", files={"file": ("m.safetensors", weights)}, data={"arch": "mlp", "arch_kwargs": json.dumps(MLP)}
    )
    dataset = client.post("/v1/datasets", files={"file": ("d.npz", data)})
    assert model.status_code == dataset.status_code == 201, (model.text, dataset.text)
    ids = {"models": [model.json()["id"]], "datasets": [dataset.json()["id"]]}
    body = {
        "model_id": ids["models"][0],
        "dataset_id": ids["datasets"][0],
        "spec": {"sparsity": 0.5, "fisher": {"samples": 64}},
    }
    created = client.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job = created.json()["id"]
    with server.session() as s:
        attempts.claim(session=s, job_id=job)
        outputs.add_metric(session=s, job_id=job, step=0, sparsity=0.0, loss=2.3, metric=0.1, seconds=0.5)
        outputs.add_metric(session=s, job_id=job, step=1, kind="finetune", epoch=1.0, sparsity=0.5, loss=1.2)
        outputs.add_event(session=s, job_id=job, type="log", data={"msg": "hello"})
        for name in ARTIFACTS:
            key = artifact_key(job, name)
            size, sha256 = store.put_stream(key, [_artifact_bytes(name)])
            outputs.add_artifact(
                session=s, job_id=job, name=name, path=key, size=size, sha256=sha256,
                kind=name.split(".")[0], media_type=artifact_media_type(name),
            )  # fmt: skip
        attempts.finish(session=s, job_id=job, attempt=1, state=JobState.SUCCEEDED, result={"sparsity": 0.5})
    return {**ids, "jobs": [job], "artifacts": ARTIFACTS}


def _toml(value: Any) -> str:
    return json.dumps(value)  # JSON strings, numbers and arrays are TOML too


NEGATIVE_REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]


def _config(key: str, ids: dict[str, list[str]], report: Path) -> str:
    lines = [
        f"hooks = {_toml(str(HOOKS))}",
        "workers = 1",
        "seed = 7",
        "request-timeout = 30",
        "max-stream-events = 50",
        "[headers]",
        f"Authorization = {_toml('Bearer ' + key)}",
        "[reports.json]",
        "enabled = true",
        f"path = {_toml(str(report))}",
        "[checks]",
        "enabled = true",
        # schemathesis's own list, plus 413: a negative body longer than a field's maxLength can exceed the JSON body
        # limit (a 2,048-character uri of \\u escapes is 12 KiB; longer, past ARBORIST_MAX_JSON_BYTES) and is refused
        # whole, before its fields are read (it failed one stateful run in three)
        f"negative_data_rejection.expected-statuses = {_toml(NEGATIVE_REJECTED)}",
    ]
    for kind, values in ids.items():
        lines += [f"[dictionaries.{kind}]", f"values = {_toml(values)}"]
    lines.append("[parameters]")
    for name, kind, p in [
        ("path.job_id", "jobs", 0.7),
        ("path.model_id", "models", 0.5),
        ("path.dataset_id", "datasets", 0.5),
        ("path.name", "artifacts", 0.8),
        ("body.model_id", "models", 0.7),
        ("body.dataset_id", "datasets", 0.7),
    ]:
        lines.append(f'"{name}" = {{ dictionary = "{kind}", probability = {p} }}')
    for method, path in CONTENT_DEPENDENT:
        lines += [
            "[[operations]]",
            f"include-method = {_toml(method)}",
            f"include-path = {_toml(path)}",
            f"checks.positive_data_acceptance.expected-statuses = {_toml(ACCEPTED)}",
        ]
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(180)
def test_openapi_all_checks_all_phases(server, make_account, tmp_path):
    account = make_account()
    ids = _seed(server, account)
    report = tmp_path / "report.json"
    config = tmp_path / "schemathesis.toml"
    config.write_text(_config(account.key, ids, report))
    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(config),
        "run",
        f"{server.base_url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        ",".join(PHASES),
        "--max-time",
        str(MAX_TIME_S),
        "--no-color",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=MAX_TIME_S + 120, cwd=tmp_path)  # its cache
    out = run.stdout + run.stderr
    print(out[-8000:])  # the summary: phases, operations, test cases (shown with -s, or on failure)
    assert report.exists(), out[-20000:]
    result = json.loads(report.read_text())
    assert (result["failures"], result["errors"]) == ([], []) and run.returncode == 0, out[-20000:]
    assert {name: p["status"] for name, p in result["phases"].items()} == dict.fromkeys(PHASES, "success"), out
    assert result["operations"]["tested"] == result["operations"]["total"] >= 20, result["operations"]


def test_documented_media_types_and_event_schema_match_what_is_sent(server, make_account):
    """Deterministically, what the fuzzing run reaches by chance: every artifact is sent as a media type its
    operation documents (with a body its schema takes), and every event of a stream matches the stream's item
    schema, its JSON ``data`` included."""
    account = make_account()
    ids = _seed(server, account)
    document = account.client.get("/openapi.json").json()
    download = document["paths"]["/v1/jobs/{job_id}/artifacts/{name}"]["get"]["responses"]["200"]["content"]
    job = ids["jobs"][0]
    sent = {}
    for name in ARTIFACTS:
        resp = account.client.get(f"/v1/jobs/{job}/artifacts/{name}")
        media = resp.headers["content-type"].split(";")[0]
        assert resp.status_code == 200 and media in download, (name, media, sorted(download))
        if media == "application/json":
            jsonschema_rs.validate(download[media]["schema"], resp.json())
        sent[name] = media
    assert sent["curve.png"] == "image/png" and sent["curve.csv"] == "text/csv"
    assert sent["report.json"] == "application/json"

    item = document["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
    schema = item["itemSchema"]
    with account.client.stream("GET", f"/v1/jobs/{job}/events") as resp:
        blocks = [b for b in resp.read().decode().split("\n\n") if b and not b.startswith(("retry:", ":"))]
    kinds = []
    for block in blocks:
        event = dict(line.split(": ", 1) for line in block.splitlines())
        jsonschema_rs.validate(schema, event)
        branch = schema["then"] if event["event"] == "end" else schema["else"]
        jsonschema_rs.validate(branch["properties"]["data"]["contentSchema"], json.loads(event["data"]))
        kinds.append(event["event"])
    assert kinds[-1] == "end" and {"state", "log", "artifact"} <= set(kinds), kinds
