"""A real S3 protocol server for tests: moto's, in a thread of the test process, on a loopback port.

Processes the tests start (uvicorn, celery workers) reach it through the standard AWS variables ``env`` gives
(``AWS_ENDPOINT_URL`` and test credentials): the same way a deployment points at MinIO or AWS S3.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import s3fs
from moto import server as moto_server


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]
    fs: s3fs.S3FileSystem

    def files(self, prefix: str) -> dict[str, int]:
        """Every object under ``prefix`` (``bucket/path``) and its size, read fresh from the server."""
        self.fs.invalidate_cache()
        try:
            return {k: int(v["size"]) for k, v in self.fs.find(prefix, detail=True).items()}
        except FileNotFoundError:
            return {}


@contextmanager
def moto_s3(*buckets: str) -> Iterator[S3Server]:
    """Starts moto's S3 server, creates ``buckets``, and sets the AWS variables in this process too (restored
    afterwards), so that an ``s3://`` artifact store made here reaches it as well."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _host, port = server.get_host_and_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(anon=False, use_listings_cache=False)
    try:
        for bucket in buckets:
            fs.mkdir(bucket)
        yield S3Server(endpoint, env, fs)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
