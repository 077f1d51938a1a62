"""Job outputs written as the worker writes them: metrics JSON/CSV, SSE events, artifact downloads."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import threading
import time

import pytest

from _api_testkit import assert_problem
from core.service.artifacts import artifact_key
from core.service.db import attempts, outputs
from core.service.db.tables import JobState


@pytest.fixture
def job_id(client, seed):
    model_id, dataset_id = seed()
    resp = client.post("/v1/jobs", json={"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}})
    return resp.json()["id"]


def test_metrics_json_and_csv(server, client, job_id):
    with server.session() as s:
        attempts.claim(session=s, job_id=job_id)
        outputs.add_metric(session=s, job_id=job_id, step=0, sparsity=0.0, loss=2.3, metric=0.1, seconds=0.5)
        outputs.add_metric(session=s, job_id=job_id, step=1, kind="finetune", epoch=1.0, sparsity=0.5, loss=1.2)
    data = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert [(m["step"], m["kind"], m["loss"]) for m in data] == [(0, "prune", 2.3), (1, "finetune", 1.2)]
    assert data[1]["metric"] is None

    for kwargs in ({"headers": {"Accept": "text/csv"}}, {"params": {"format": "csv"}}):
        resp = client.get(f"/v1/jobs/{job_id}/metrics", **kwargs)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(resp.text)))
        assert [r["step"] for r in rows] == ["0", "1"]
        assert rows[0]["loss"] == "2.3" and rows[1]["metric"] == "" and rows[1]["kind"] == "finetune"
    assert client.get(f"/v1/jobs/{job_id}/metrics", params={"format": "json"}, headers={"Accept": "text/csv"}).json()[
        "data"
    ]


def _read_sse(resp) -> list[dict]:
    events, current = [], {}
    for line in resp.iter_lines():
        if line == "":
            if current:
                events.append(current)
            current = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(": ")
        current[key] = value
    if current:
        events.append(current)
    return [e for e in events if "event" in e]


def test_events_replay_and_follow_until_terminal(server, client, job_id):
    with server.session() as s:
        attempts.claim(session=s, job_id=job_id)
        attempts.write_progress(session=s, job_id=job_id, attempt=1, progress=0.25, step=1, sparsity=0.2)
        outputs.add_event(session=s, job_id=job_id, type="log", data={"msg": "hello"})

    def finish_later():
        time.sleep(0.4)
        with server.session() as s:
            attempts.write_progress(session=s, job_id=job_id, attempt=1, progress=0.9, step=2)
            attempts.finish(session=s, job_id=job_id, attempt=1, state=JobState.SUCCEEDED)

    t = threading.Thread(target=finish_later)
    t.start()
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = _read_sse(resp)
    t.join()
    types = [e["event"] for e in events]
    assert types == ["state", "state", "progress", "log", "progress", "state", "end"], types
    ids = [int(e["id"]) for e in events if "id" in e]
    assert ids == list(range(1, 7))
    payloads = [json.loads(e["data"]) for e in events]
    assert payloads[0]["data"] == {"state": "queued"} and payloads[1]["data"]["state"] == "running"
    assert payloads[3]["data"] == {"msg": "hello"}
    assert payloads[5]["data"]["state"] == "succeeded"
    assert payloads[6] == {"state": "succeeded"}

    # reconnect: replay after Last-Event-ID (or ?after=), then end at once since the job is terminal
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "4"}) as resp:
        again = _read_sse(resp)
    assert [e.get("id") for e in again] == ["5", "6", None]
    with client.stream("GET", f"/v1/jobs/{job_id}/events", params={"after": 5}) as resp:
        assert [e["event"] for e in _read_sse(resp)] == ["state", "end"]


def test_events_stream_is_bounded(server, client, job_id):
    start = time.monotonic()
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        events = _read_sse(resp)
    elapsed = time.monotonic() - start
    assert [e["event"] for e in events] == ["state"]  # still queued: closed at the time limit, no `end`
    assert server.settings.sse_max_seconds - 0.5 <= elapsed < server.settings.sse_max_seconds + 3


def test_artifact_download_etag_and_304(server, client, job_id):
    payload = b"pruned weights " * 1000
    key = artifact_key(job_id, "model.safetensors")
    size, sha = server.store.put_stream(key, [payload[:5000], payload[5000:]])
    assert (size, sha) == (len(payload), hashlib.sha256(payload).hexdigest())
    with server.session() as s:
        attempts.claim(session=s, job_id=job_id)
        outputs.add_artifact(
            session=s, job_id=job_id, name="model.safetensors", path=key, size=size, sha256=sha, kind="model"
        )
        outputs.add_artifact(
            session=s,
            job_id=job_id,
            name="report.json",
            path=key,
            size=size,
            sha256=sha,
            kind="report",
            media_type="application/json",
        )

    listed = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert [a["name"] for a in listed] == ["model.safetensors", "report.json"]
    assert listed[0]["url"] == f"/v1/jobs/{job_id}/artifacts/model.safetensors" and listed[0]["sha256"] == sha

    resp = client.get(listed[0]["url"])
    assert resp.status_code == 200 and resp.content == payload
    assert resp.headers["content-length"] == str(len(payload))
    assert resp.headers["etag"] == f'"{sha}"'
    assert resp.headers["x-checksum-sha256"] == sha
    assert resp.headers["digest"] == "sha-256=" + base64.b64encode(bytes.fromhex(sha)).decode()
    assert resp.headers["content-type"] == "application/octet-stream"

    cached = client.get(listed[0]["url"], headers={"If-None-Match": f'"{sha}"'})
    assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == f'"{sha}"'
    assert client.get(listed[0]["url"], headers={"If-None-Match": '"other"'}).status_code == 200
    assert_problem(client.get(f"/v1/jobs/{job_id}/artifacts/nope.bin"), 404)
