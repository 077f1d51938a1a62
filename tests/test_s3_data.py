"""s3:// datasets through fsspec/s3fs against a real S3 protocol server (moto's, on a loopback port)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import s3fs
from moto import server as moto_server

from core.errors import Forbidden
from core.io.data import load_dataset


@pytest.fixture(scope="module")
def s3(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[s3fs.S3FileSystem]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _host, port = server.get_host_and_port()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch_module.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(anon=False)
    fs.mkdir("arborist-data")
    try:
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _npz(n: int = 30) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x=rng.normal(size=(n, 8)).astype(np.float32), y=rng.integers(0, 3, n))
    return buf.getvalue()


def test_s3_dataset_under_an_allowed_prefix_loads(s3, tmp_path):
    s3.pipe("arborist-data/team-a/train.npz", _npz())
    data = load_dataset("s3://arborist-data/team-a/train.npz", allowed_roots=["s3://arborist-data/team-a"])
    assert len(data) == 30 and data.x_train.shape[1:] == (8,)


def test_s3_outside_the_allowed_prefix_is_refused_before_any_read(s3):
    s3.pipe("arborist-data/team-b/secret.npz", _npz())
    for uri in (
        "s3://arborist-data/team-b/secret.npz",
        "s3://arborist-data/team-a/../team-b/secret.npz",
        "s3://other-bucket/team-a/x.npz",
    ):
        with pytest.raises(Forbidden):
            load_dataset(uri, allowed_roots=["s3://arborist-data/team-a"])


def test_missing_s3_object_is_a_clear_input_error(s3):
    from core.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"team-a/missing\.npz"):
        load_dataset("s3://arborist-data/team-a/missing.npz", allowed_roots=["s3://arborist-data/team-a"])
