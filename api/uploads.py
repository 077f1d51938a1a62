"""Streaming ``multipart/form-data``: the file part goes chunk by chunk into the artifact store.

Nothing is spooled to a temporary file first (unlike ``Request.form()``), so the byte cap applies while the
upload arrives and memory stays flat. On any failure the partly written file is deleted.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

import anyio
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from core.errors import InvalidInput, TooLarge, UnsupportedMediaType
from core.service.artifacts import ArtifactStore, StreamWriter

FIELD_MAX_BYTES = 64 * 1024
MAX_FIELDS = 32
# Room for part headers, boundaries and the small text fields on top of the file's own cap.
ENVELOPE_BYTES = MAX_FIELDS * FIELD_MAX_BYTES + 64 * 1024
FLUSH_BYTES = 1024 * 1024


def is_multipart(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


def safe_suffix(filename: str | None) -> str:
    """The upload's extension, if harmless (``.safetensors``, ``.npz``...), as a hint for format detection."""
    if not filename:
        return ""
    m = re.search(r"(\.[A-Za-z0-9]{1,16})$", filename)
    return m.group(1).lower() if m else ""


@dataclass
class UploadedFile:
    key: str
    filename: str | None
    content_type: str | None
    size: int
    sha256: str


@dataclass
class MultipartUpload:
    fields: dict[str, str] = field(default_factory=dict)
    file: UploadedFile | None = None


class _Part:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.name: str = ""
        self.filename: str | None = None
        self.data = bytearray()
        self.is_file = False


async def receive_upload(
    request: Request,
    *,
    store: ArtifactStore,
    staging_prefix: str,
    max_bytes: int,
    file_field: str = "file",
) -> MultipartUpload:
    """Parses the request body. The file in ``file_field`` (required, exactly one) is written to a staging key
    under ``staging_prefix``; the caller moves it into place or deletes it. Text fields come back decoded."""
    content_type = request.headers.get("content-type")
    if not is_multipart(content_type):
        raise UnsupportedMediaType("Expected multipart/form-data")
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidInput("multipart/form-data without a boundary")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + ENVELOPE_BYTES:
        raise TooLarge(f"Upload exceeds the limit of {max_bytes} bytes")

    result = MultipartUpload()
    writer: StreamWriter | None = None
    file_meta: dict[str, str | None] = {}
    pending: list[bytes] = []
    pending_bytes = 0
    state = {"part": _Part(), "header_field": b"", "header_value": b""}

    def on_part_begin() -> None:
        state["part"] = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]

    def on_header_end() -> None:
        part: _Part = state["part"]
        part.headers[bytes(state["header_field"]).lower()] = bytes(state["header_value"])
        state["header_field"], state["header_value"] = b"", b""

    def on_headers_finished() -> None:
        nonlocal writer
        part: _Part = state["part"]
        _, opts = parse_options_header(part.headers.get(b"content-disposition", b""))
        if b"name" not in opts:
            raise InvalidInput('A multipart part lacks Content-Disposition "name"')
        part.name = opts[b"name"].decode("utf-8", "replace")
        if b"filename" in opts or part.name == file_field:
            part.is_file = True
            part.filename = opts[b"filename"].decode("utf-8", "replace") if b"filename" in opts else None
            if part.name != file_field:
                raise InvalidInput(f"Unexpected file part {part.name!r}; send the file as {file_field!r}")
            if writer is not None:
                raise InvalidInput("Send exactly one file")
            key = f"{staging_prefix}/{uuid.uuid4().hex}{safe_suffix(part.filename)}"
            writer = store.writer(key, max_bytes=max_bytes)
            ct = part.headers.get(b"content-type")
            file_meta.update(key=key, filename=part.filename, content_type=ct.decode("latin-1") if ct else None)
        elif len(result.fields) >= MAX_FIELDS:
            raise InvalidInput("Too many form fields")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal pending_bytes
        part: _Part = state["part"]
        if part.is_file:
            pending.append(data[start:end])
            pending_bytes += end - start
        else:
            part.data += data[start:end]
            if len(part.data) > FIELD_MAX_BYTES:
                raise InvalidInput(f"Form field {part.name!r} exceeds {FIELD_MAX_BYTES} bytes")

    def on_part_end() -> None:
        part: _Part = state["part"]
        if not part.is_file:
            try:
                result.fields[part.name] = bytes(part.data).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"Form field {part.name!r} is not UTF-8") from None

    def flush(w: StreamWriter, chunks: list[bytes]) -> None:
        for c in chunks:
            w.write(c)

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes + ENVELOPE_BYTES:
                raise TooLarge(f"Upload exceeds the limit of {max_bytes} bytes")
            parser.write(chunk)
            if writer is not None and (pending_bytes >= FLUSH_BYTES or not chunk):
                batch, pending[:], pending_bytes = list(pending), [], 0
                await anyio.to_thread.run_sync(flush, writer, batch)
        parser.finalize()
        if writer is None:
            raise InvalidInput(
                "No file in the upload",
                errors=[{"loc": ["body", file_field], "msg": "Field required", "type": "missing"}],
            )
        if pending:
            batch, pending[:] = list(pending), []
            await anyio.to_thread.run_sync(flush, writer, batch)
        size, sha256 = await anyio.to_thread.run_sync(writer.commit)
    except FormParserError as exc:
        if writer is not None:
            writer.abort()
        raise InvalidInput(f"Malformed multipart body: {exc}") from None
    except ClientDisconnect:
        if writer is not None:
            writer.abort()
        raise InvalidInput("The client disconnected before the upload was complete") from None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    result.file = UploadedFile(
        key=str(file_meta["key"]),
        filename=file_meta.get("filename"),
        content_type=file_meta.get("content_type"),
        size=size,
        sha256=sha256,
    )
    return result
