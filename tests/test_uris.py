"""Data locations: only files under allowed roots (or allowed s3 prefixes) may be read."""

from __future__ import annotations

import os
import sys

import pytest
from fsspec.implementations.local import LocalFileSystem

from core.errors import Forbidden, InvalidInput, TooLarge
from core.io.uris import fetch_to_local, resolve_uri


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "allowed"
    (r / "sub").mkdir(parents=True)
    (r / "sub" / "data.npz").write_bytes(b"abc")
    (tmp_path / "secret.txt").write_text("top secret")
    return r


def test_bare_path_and_file_uri_resolve(root):
    fs, path = resolve_uri(str(root / "sub" / "data.npz"), [str(root)])
    assert isinstance(fs, LocalFileSystem) and path == os.path.realpath(root / "sub" / "data.npz")
    fs, path2 = resolve_uri(f"file://{root}/sub/data.npz", [f"file://{root}"])
    assert path2 == path
    # Percent-encoding and "localhost" are understood; "." and inner ".." that stay inside are fine.
    _, path3 = resolve_uri(f"file://localhost{root}/sub/./../sub/data%2Enpz", [str(root)])
    assert path3 == path


def test_root_itself_and_prefix_siblings(root, tmp_path):
    assert resolve_uri(str(root), [str(root)])[1] == os.path.realpath(root)
    sibling = tmp_path / "allowed-not"  # shares a string prefix with the root, but is outside it
    sibling.mkdir()
    (sibling / "x").write_bytes(b"x")
    with pytest.raises(Forbidden):
        resolve_uri(str(sibling / "x"), [str(root)])


def test_etc_passwd_refused(root):
    with pytest.raises(Forbidden, match="outside the allowed"):
        resolve_uri("file:///etc/passwd", [str(root)])
    with pytest.raises(Forbidden):
        resolve_uri("/etc/passwd", [str(root)])


def test_dotdot_traversal_refused(root):
    for uri in (
        f"{root}/../secret.txt",
        f"{root}/sub/../../secret.txt",
        f"file://{root}/../secret.txt",
        f"file://{root}/%2E%2E/secret.txt",
    ):
        with pytest.raises(Forbidden):
            resolve_uri(uri, [str(root)])


def test_relative_path_resolved_against_cwd(root, monkeypatch):
    monkeypatch.chdir(root / "sub")
    assert resolve_uri("data.npz", [str(root)])[1] == os.path.realpath(root / "sub" / "data.npz")
    with pytest.raises(Forbidden):
        resolve_uri("../../secret.txt", [str(root)])


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_symlink_escaping_root_refused(root, tmp_path):
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    (root / "escape_dir").symlink_to(tmp_path)
    with pytest.raises(Forbidden):
        resolve_uri(str(root / "escape"), [str(root)])
    with pytest.raises(Forbidden):
        resolve_uri(str(root / "escape_dir" / "secret.txt"), [str(root)])
    with pytest.raises(Forbidden):
        fetch_to_local(str(root / "escape"), [str(root)], tmp_path / "dest", 10**6)
    # A symlink that stays inside the root is fine.
    (root / "inside").symlink_to(root / "sub" / "data.npz")
    assert resolve_uri(str(root / "inside"), [str(root)])[1] == os.path.realpath(root / "sub" / "data.npz")


def test_symlinked_root_is_resolved(root, tmp_path):
    link = tmp_path / "root-link"
    link.symlink_to(root)
    assert resolve_uri(str(root / "sub" / "data.npz"), [str(link)])[1] == os.path.realpath(root / "sub" / "data.npz")


@pytest.mark.parametrize(
    "uri",
    [
        "http://example.com/data.npz",
        "https://example.com/data.npz",
        "ftp://example.com/data.npz",
        "data:application/octet-stream;base64,AAAA",
        "gs://bucket/data.npz",
        "memory://x",
        "hdfs://namenode/x",
        "zip://x::file:///etc/passwd",
    ],
)
def test_other_schemes_refused(root, uri):
    with pytest.raises(Forbidden, match="unsupported scheme"):
        resolve_uri(uri, [str(root), "s3://bucket/"])


def test_file_uri_with_remote_host_refused(root):
    with pytest.raises(Forbidden, match="remote host"):
        resolve_uri(f"file://evil.example.com{root}/sub/data.npz", [str(root)])


def test_malformed_inputs(root):
    for bad in ("", "   ", f"{root}/sub/data.npz\x00.txt"):
        with pytest.raises(InvalidInput):
            resolve_uri(bad, [str(root)])
    with pytest.raises(Forbidden):
        resolve_uri(str(root / "sub" / "data.npz"), [])  # no roots: nothing is allowed


def test_s3_requires_an_allowed_prefix(root):
    roots = [str(root), "s3://bucket/data"]
    for uri in ("s3://other/data/x.npz", "s3://bucket/database/x.npz", "s3://bucket/x.npz"):
        with pytest.raises(Forbidden):
            resolve_uri(uri, roots)
    with pytest.raises(Forbidden):
        resolve_uri("s3://bucket/data/../private/x.npz", roots)
    with pytest.raises(Forbidden):
        resolve_uri("s3://bucket/data/x.npz", [str(root)])  # no s3 root at all


def test_s3_allowed_prefix_without_s3fs(root):
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(InvalidInput, match="s3fs"):
            resolve_uri("s3://bucket/data/x.npz", ["s3://bucket/data"])
    else:
        _fs, path = resolve_uri("s3://bucket/data/x.npz", ["s3://bucket/data"])
        assert path == "bucket/data/x.npz"


def test_fetch_to_local_copies_atomically(root, tmp_path):
    payload = os.urandom(3 * (1 << 20) + 17)  # several chunks
    (root / "sub" / "big.bin").write_bytes(payload)
    dest = tmp_path / "dest"
    out = fetch_to_local(f"file://{root}/sub/big.bin", [str(root)], dest, max_bytes=len(payload))
    assert out == dest / "big.bin" and out.read_bytes() == payload
    assert sorted(p.name for p in dest.iterdir()) == ["big.bin"]


def test_fetch_to_local_enforces_max_bytes(root, tmp_path):
    (root / "sub" / "big.bin").write_bytes(b"x" * 5000)
    dest = tmp_path / "dest"
    with pytest.raises(TooLarge):
        fetch_to_local(str(root / "sub" / "big.bin"), [str(root)], dest, max_bytes=4999)
    assert list(dest.iterdir()) == []  # no partial or temporary file left behind


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_fetch_to_local_streaming_cap_beyond_declared_size(tmp_path):
    # /proc files declare size 0 yet hold data: the cap must hold while streaming, not only on stat.
    assert os.stat("/proc/self/status").st_size == 0
    dest = tmp_path / "dest"
    with pytest.raises(TooLarge):
        fetch_to_local("/proc/self/status", ["/proc/self"], dest, max_bytes=10)
    assert list(dest.iterdir()) == []
    out = fetch_to_local("/proc/self/status", ["/proc/self"], dest, max_bytes=1 << 20)
    assert b"Pid:" in out.read_bytes()


def test_fetch_to_local_refuses_special_files(root, tmp_path):
    fifo = root / "sub" / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInput, match="not a regular file"):
        fetch_to_local(str(fifo), [str(root)], tmp_path / "dest", max_bytes=10)


def test_fetch_to_local_refusals(root, tmp_path):
    dest = tmp_path / "dest"
    with pytest.raises(Forbidden):
        fetch_to_local("file:///etc/passwd", [str(root)], dest, 10**6)
    with pytest.raises(Forbidden):
        fetch_to_local("http://example.com/x", [str(root)], dest, 10**6)
    with pytest.raises(InvalidInput, match="not found"):
        fetch_to_local(str(root / "sub" / "missing.npz"), [str(root)], dest, 10**6)
    with pytest.raises(InvalidInput, match="not a regular file"):
        fetch_to_local(str(root / "sub"), [str(root)], dest, 10**6)
