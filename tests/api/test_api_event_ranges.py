"""Where an events stream starts: ``?after=`` and ``Last-Event-ID`` are checked before the stream does.

An out-of-range position used to get a 200 and then a stream cut mid-body by a database error (an ``int4``
overflow on PostgreSQL past 2^31 - 1, an SQLite overflow past 2^63 - 1). Event ids are the sequence numbers the
stream sends (``id: <seq>``), 32-bit on every database: anything else is a 422 problem naming the parameter, on
both stacks, and a valid position replays what follows it.
"""

from __future__ import annotations

import pytest

from _api_testkit import assert_problem
from core.service.db import attempts, outputs
from core.service.db.tables import JobState

MAX_SEQ = 2**31 - 1


@pytest.fixture
def finished_job(server, client, seed) -> str:
    """A succeeded job with events 1..4 (queued, running, a log line, succeeded): its stream ends at once."""
    model_id, dataset_id = seed()
    body = {"model_id": model_id, "dataset_id": dataset_id, "spec": {"sparsity": 0.5}}
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    with server.session() as s:
        attempts.claim(session=s, job_id=job_id)
        outputs.add_event(session=s, job_id=job_id, type="log", data={"msg": "hello"})
        attempts.finish(session=s, job_id=job_id, attempt=1, state=JobState.SUCCEEDED)
    return job_id


def _ids(client, job_id: str, **kwargs) -> tuple[list[int], str]:
    """The ids of the events a stream replays, and the state its ``end`` event reports."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", **kwargs) as resp:
        assert resp.status_code == 200, resp.read()
        blocks = resp.read().decode().split("\n\n")
    ids = [int(line[4:]) for b in blocks for line in b.splitlines() if line.startswith("id: ")]
    end = [b for b in blocks if b.startswith("event: end")]
    assert len(end) == 1, blocks
    return ids, end[0]


@pytest.mark.parametrize(
    ("params", "headers", "loc"),
    [
        ({"after": MAX_SEQ + 1}, {}, ["query", "after"]),  # PostgreSQL's int4 overflow, mid-stream
        ({"after": 2**63}, {}, ["query", "after"]),  # SQLite's overflow, mid-stream
        ({"after": -1}, {}, ["query", "after"]),
        ({}, {"Last-Event-ID": str(MAX_SEQ + 1)}, ["header", "last-event-id"]),
        ({}, {"Last-Event-ID": "9" * 32}, ["header", "last-event-id"]),
        ({}, {"Last-Event-ID": "-3"}, ["header", "last-event-id"]),
        ({}, {"Last-Event-ID": "abc"}, ["header", "last-event-id"]),  # not an id this server sent
        ({"after": 1}, {"Last-Event-ID": "1e3"}, ["header", "last-event-id"]),
    ],
)
def test_out_of_range_start_is_422_before_the_stream(client, finished_job, params, headers, loc):
    resp = client.get(f"/v1/jobs/{finished_job}/events", params=params, headers=headers)
    body = assert_problem(resp, 422, "validation-error")
    assert [e["loc"] for e in body["errors"]] == [loc], body


def test_valid_starts_replay_what_follows(client, finished_job):
    assert _ids(client, finished_job)[0] == [1, 2, 3, 4]
    assert _ids(client, finished_job, params={"after": 2})[0] == [3, 4]
    assert _ids(client, finished_job, headers={"Last-Event-ID": "3"})[0] == [4]
    assert _ids(client, finished_job, params={"after": 1}, headers={"Last-Event-ID": "3"})[0] == [4]  # the later
    ids, end = _ids(client, finished_job, params={"after": MAX_SEQ}, headers={"Last-Event-ID": str(MAX_SEQ)})
    assert ids == [] and '"state": "succeeded"' in end  # the largest position is valid: nothing follows it
