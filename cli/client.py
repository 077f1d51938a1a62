"""The Python client of the Arborist API (``/v1``), for scripts and MLOps pipelines.

    from cli.client import Client

    with Client("http://127.0.0.1:8000", api_key) as arb:
        model = arb.upload_model("mlp.safetensors", arch="mlp", arch_kwargs={"in_features": 64, ...})
        data = arb.upload_dataset("digits.npz")
        job = arb.submit(model["id"], data["id"], {"method": "woodfisher", "sparsity": 0.8})
        job = arb.wait(job["id"], on_event=print)          # follows the event stream to the end
        arb.download(job["id"], "pruned.safetensors", "out/")

Every method returns the API's JSON as plain dicts (the documented, versioned schema). Errors are raised as
``ApiError``, which carries the RFC 9457 problem (``type``, ``title``, ``status``, ``detail``, ``errors``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from cli.pack import packed

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
Event = tuple[str, dict[str, Any]]


class ApiError(Exception):
    """A non-2xx answer; ``problem`` is the RFC 9457 body (or a synthesised one for non-problem bodies)."""

    def __init__(self, status: int, problem: dict[str, Any]):
        self.status = status
        self.problem = problem
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}".strip())

    @property
    def type(self) -> str:
        return str(self.problem.get("type", "about:blank"))


class Client:
    """A thin, synchronous client over httpx; one instance per API key (thread-safe for concurrent calls)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        base_url = base_url or os.environ.get("ARBORIST_URL", "http://127.0.0.1:8000")
        api_key = api_key or os.environ.get("ARBORIST_API_KEY")
        if not api_key:
            raise ValueError("an API key is required (argument or ARBORIST_API_KEY)")
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- plumbing ---------------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        resp = self._http.request(method, path, **kwargs)
        _raise_for_problem(resp)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._call(method, path, **kwargs).json()

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        cursor = None
        while True:
            page = self._json("GET", path, params={**params, **({"cursor": cursor} if cursor else {})})
            yield from page["data"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    # --- models and datasets ------------------------------------------------------------------------------------

    def upload_model(
        self,
        path: str | Path,
        *,
        arch: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        """Uploads a safetensors state dict (with a zoo ``arch``), a single-file ONNX model, or a Hugging Face model
        (a folder, zipped here, or its .zip / .tar.gz)."""
        fields = {
            k: v
            for k, v in {
                "name": name,
                "arch": arch,
                "arch_kwargs": json.dumps(arch_kwargs) if arch_kwargs else None,
            }.items()
            if v
        }
        with packed(path) as upload, open(upload, "rb") as fh:
            filename = Path(path).name + (".zip" if Path(path).is_dir() else "")
            return self._json(
                "POST", "/v1/models", data=fields, files={"file": (filename, fh, "application/octet-stream")}
            )

    def upload_dataset(self, path: str | Path, *, name: str | None = None, format: str | None = None) -> dict[str, Any]:
        fields = {k: v for k, v in {"name": name, "format": format}.items() if v}
        with open(path, "rb") as fh:
            return self._json(
                "POST", "/v1/datasets", data=fields, files={"file": (Path(path).name, fh, "application/octet-stream")}
            )

    def register_dataset(self, uri: str, *, name: str | None = None, format: str | None = None) -> dict[str, Any]:
        """Registers data the server can read (a path or URI under its allowed roots) without uploading it."""
        body = {k: v for k, v in {"uri": uri, "name": name, "format": format}.items() if v}
        return self._json("POST", "/v1/datasets", json=body)

    def models(self) -> Iterator[dict[str, Any]]:
        return self._pages("/v1/models", {})

    def datasets(self) -> Iterator[dict[str, Any]]:
        return self._pages("/v1/datasets", {})

    def model(self, model_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/models/{model_id}")

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def delete_model(self, model_id: str) -> None:
        self._call("DELETE", f"/v1/models/{model_id}")

    def delete_dataset(self, dataset_id: str) -> None:
        self._call("DELETE", f"/v1/datasets/{dataset_id}")

    # --- jobs ---------------------------------------------------------------------------------------------------

    def submit(
        self,
        model_id: str,
        dataset_id: str,
        spec: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        priority: int | None = None,
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body: dict[str, Any] = {"model_id": model_id, "dataset_id": dataset_id, "spec": spec}
        if priority is not None:
            body["priority"] = priority  # within the tenant, higher first
        return self._json("POST", "/v1/jobs", headers=headers, json=body)

    def usage(self) -> dict[str, Any]:
        """The tenant's running and queued jobs and stored bytes, beside its limits."""
        return self._json("GET", "/v1/usage")

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def jobs(self, state: str | None = None) -> Iterator[dict[str, Any]]:
        return self._pages("/v1/jobs", {"state": state} if state else {})

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def retry(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/retry")

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/jobs/{job_id}/metrics")["data"]

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/jobs/{job_id}/artifacts")["data"]

    def events(self, job_id: str, *, after: int = 0) -> Iterator[Event]:
        """``(event, data)`` pairs from the job's event stream, from ``seq > after`` until ``end``.

        The server closes a stream after a while; this reconnects with ``Last-Event-ID`` (and after a dropped
        connection), so nothing is skipped or repeated.
        """
        last = after
        while True:
            try:
                with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", params={"after": last}, timeout=httpx.Timeout(30.0, read=None)
                ) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        _raise_for_problem(resp)
                    for kind, data in _parse_sse(resp.iter_lines()):
                        if kind == "end":
                            yield kind, data
                            return
                        last = max(last, int(data.get("seq", last)))
                        yield kind, data
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
                time.sleep(1.0)  # server restarting or connection dropped: resume after the last event seen

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Follows the events until the job is finished; returns the final job. ``TimeoutError`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for kind, data in self.events(job_id):
            if on_event:
                on_event(kind, data)
            if kind == "end":
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout:.0f} s")
        return self.job(job_id)

    def download(self, job_id: str, name: str, dest: str | Path = ".") -> Path:
        """Streams an artifact to ``dest`` (a directory or a file path); checks its sha256; writes atomically."""
        dest = Path(dest)
        target = dest / name if dest.is_dir() else dest
        tmp = target.with_name(f".{target.name}.part")
        digest = hashlib.sha256()
        with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as resp:
            if resp.status_code >= 400:
                resp.read()
                _raise_for_problem(resp)
            expected = resp.headers.get("x-checksum-sha256")
            try:
                with open(tmp, "wb") as fh:
                    for chunk in resp.iter_bytes(1 << 20):
                        digest.update(chunk)
                        fh.write(chunk)
                if expected and digest.hexdigest() != expected:
                    raise OSError(f"{name}: sha256 {digest.hexdigest()} does not match the server's {expected}")
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        return target


def _raise_for_problem(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        problem = resp.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"title": resp.reason_phrase, "status": resp.status_code, "detail": resp.text[:500]}
    raise ApiError(resp.status_code, problem)


def _parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    kind, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
