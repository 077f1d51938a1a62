"""The artifact store on S3 (issue #19), against moto's S3 server in a process of its own (so that this process's
memory is the client's only): writes are atomic (no reader sees a partial object, an aborted or oversized write
leaves no object and no unfinished multipart upload), memory stays flat while gigabytes could stream, and
checkpoints written by one worker are read by another through the bucket alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
import torch

from _net import free_port
from core.errors import TooLarge
from core.service.artifacts import S3_BLOCK_BYTES, ArtifactStore
from core.service.checkpoints import checkpointer_for, delete_checkpoint

BUCKET = "arb-store"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    pytest.fail("moto_server exited")
                time.sleep(0.1)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {
                "AWS_ENDPOINT_URL": url,
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1",
            }.items():
                mp.setenv(key, value)
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def store(endpoint: str, request: pytest.FixtureRequest) -> ArtifactStore:
    return ArtifactStore(f"s3://{BUCKET}/{request.node.name[:40]}")


def _objects(prefix: str) -> list[str]:
    resp = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def _unfinished_uploads() -> list[str]:
    return [u["Key"] for u in boto3.client("s3").list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])]


def _chunks(total: int, size: int = MiB) -> Iterator[bytes]:
    for i in range(total // size):
        yield bytes([i % 251]) * size


def _write_measured(store: ArtifactStore, key: str, total: int) -> tuple[int, list[bool]]:
    """Streams ``total`` bytes under ``key``; returns this process's peak of traced memory meanwhile and whether the
    key existed at two points of the write (after parts were uploaded)."""
    seen = []
    writer = store.writer(key)
    tracemalloc.start()
    try:
        for i, chunk in enumerate(_chunks(total)):
            writer.write(chunk)
            if i in (10, 20):
                seen.append(store.exists(key))
        size, _ = writer.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == total and store.size(key) == total
    return peak, seen


def test_a_large_object_streams_with_flat_memory_and_appears_only_when_complete(store: ArtifactStore) -> None:
    small, _ = _write_measured(store, "jobs/j/small.bin", 24 * MiB)
    large, seen = _write_measured(store, "jobs/j/large.bin", 72 * MiB)
    assert seen == [False, False]  # no reader sees a partial object
    # Memory is a few multipart parts (the buffer, the HTTP client's copies), whatever the object's size: three
    # times the bytes, not one more part of memory.
    assert large < small + S3_BLOCK_BYTES, f"peak {small / MiB:.1f} MiB for 24 MiB, {large / MiB:.1f} MiB for 72"
    assert large < 72 * MiB / 2
    names = [k.rsplit("/", 1)[-1] for k in _objects(store.root.split("/", 1)[1])]
    assert names == ["large.bin", "small.bin"]  # no temporary object left
    assert sum(len(c) for c in store.iter_chunks("jobs/j/large.bin")) == 72 * MiB


def test_an_aborted_or_oversized_write_leaves_nothing(store: ArtifactStore) -> None:
    prefix = store.root.split("/", 1)[1]
    writer = store.writer("uploads/a.bin")
    for chunk in _chunks(20 * MiB):  # past one part: a multipart upload is under way
        writer.write(chunk)
    writer.abort()
    with pytest.raises(TooLarge):
        store.put_stream("uploads/b.bin", _chunks(20 * MiB), max_bytes=18 * MiB)
    assert _objects(prefix) == []
    assert not [k for k in _unfinished_uploads() if k.startswith(prefix)]  # aborted, not completed nor left open


def test_checkpoints_go_through_the_bucket_to_another_worker(store: ArtifactStore, tmp_path: Path) -> None:
    first = checkpointer_for(store, "job_a", tmp_path / "host-a")
    assert first.load() is None
    first.save({"w": torch.arange(4.0)}, {"epoch": 1})
    first.save({"w": torch.arange(4.0) * 2}, {"epoch": 2})
    other = ArtifactStore(store.url)  # another process's store, another host's scratch
    tensors, meta = checkpointer_for(other, "job_a", tmp_path / "host-b").load()
    assert meta == {"epoch": 2} and torch.equal(tensors["w"], torch.arange(4.0) * 2)
    prefix = store.root.split("/", 1)[1]
    assert [k.rsplit("/", 1)[-1] for k in _objects(prefix)] == ["latest.json", "state-2.safetensors"]
    # the next generation continues from the bucket's, whoever writes it
    checkpointer_for(other, "job_a", tmp_path / "host-c").save({"w": torch.zeros(4)}, {"epoch": 3})
    assert [k.rsplit("/", 1)[-1] for k in _objects(prefix)] == ["latest.json", "state-3.safetensors"]
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing kept on local disk
    delete_checkpoint(store, "job_a")
    assert _objects(prefix) == []


def test_an_object_written_by_another_process_is_seen_at_once(store: ArtifactStore) -> None:
    """No listing cache: a key another host wrote after this store listed its directory is found."""
    assert not store.exists("jobs/x/report.json")
    store.sweep(older_than_s=3600)  # lists the whole prefix
    code = (
        "import sys; from core.service.artifacts import ArtifactStore; "
        f"ArtifactStore({store.url!r}).put_stream('jobs/x/report.json', [b'{{}}'])"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert store.exists("jobs/x/report.json") and store.size("jobs/x/report.json") == 2
