"""The Python client (cli/client.py) against the real server: event streams that outlive the server's stream
limit, pagination, problems as ApiError, and downloads that are checked and atomic."""

from __future__ import annotations

import threading
import time

import pytest

from cli.client import ApiError, Client
from core.service.artifacts import artifact_key
from core.service.db import attempts, outputs
from core.service.db.tables import JobState


@pytest.fixture
def arb(server, account):
    with Client(server.base_url, account.key, timeout=30) as client:
        yield client


def test_wait_reconnects_across_stream_limits_without_losing_events(server, arb, seed):
    model_id, dataset_id = seed()
    job_id = arb.submit(model_id, dataset_id, {"sparsity": 0.5})["id"]
    limit = server.settings.sse_max_seconds  # the server closes each stream after this long

    def worker():
        with server.session() as s:
            attempt = attempts.claim(session=s, job_id=job_id).attempts
        for i in range(3):
            time.sleep(limit * 0.8)  # the events land in different streams
            with server.session() as s:
                attempts.write_progress(session=s, job_id=job_id, attempt=attempt, progress=(i + 1) / 4, step=i)
        with server.session() as s:
            attempts.finish(session=s, job_id=job_id, attempt=attempt, state=JobState.SUCCEEDED)

    seen: list[tuple[str, dict]] = []
    thread = threading.Thread(target=worker)
    started = time.monotonic()
    thread.start()
    final = arb.wait(job_id, timeout=60, on_event=lambda kind, data: seen.append((kind, data)))
    thread.join()
    assert time.monotonic() - started > limit  # at least one reconnect happened
    assert final["state"] == "succeeded"
    seqs = [d["seq"] for k, d in seen if k != "end"]
    assert seqs == list(range(1, len(seqs) + 1))  # none lost, none repeated
    assert [d["data"]["progress"] for k, d in seen if k == "progress"] == [0.25, 0.5, 0.75]
    assert seen[-1] == ("end", {"state": "succeeded"})


def test_pagination_errors_and_download(server, arb, seed, tmp_path):
    model_id, dataset_id = seed()
    ids = [arb.submit(model_id, dataset_id, {"sparsity": 0.5})["id"] for _ in range(3)]
    assert sorted(j["id"] for j in arb._pages("/v1/jobs", {"limit": 2})) == sorted(ids)
    assert {j["id"] for j in arb.jobs(state="queued")} == set(ids)

    with pytest.raises(ApiError) as err:
        arb.job("missing")
    assert err.value.status == 404 and err.value.type.endswith("not-found")

    key = artifact_key(ids[0], "report.json")
    size, sha = server.store.put_stream(key, [b'{"ok": true}'])
    with server.session() as s:
        outputs.add_artifact(session=s, job_id=ids[0], name="report.json", path=key, size=size, sha256=sha)
    path = arb.download(ids[0], "report.json", tmp_path)
    assert path.read_bytes() == b'{"ok": true}' and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    with pytest.raises(ApiError):
        arb.download(ids[0], "nothing.bin", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no partial file left


def test_client_needs_a_key(monkeypatch):
    monkeypatch.delenv("ARBORIST_API_KEY", raising=False)
    with pytest.raises(ValueError, match="API key"):
        Client("http://127.0.0.1:1")
