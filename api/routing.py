"""A route class for JSON bodies: 415 for a non-JSON content type, 413 past ``max_json_bytes`` (checked on
Content-Length and again while reading, so chunked bodies are capped too). Routes without a declared body
(uploads read the stream themselves) pass through. And a middleware that closes the connection after a response
given before the request body was read to its end (so a refused upload is not drained)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import TooLarge, UnsupportedMediaType


def is_json_media_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def read_json_body(request: Request, max_bytes: int) -> bytes:
    """Reads the body (cached on the request for FastAPI) or raises 415/413."""
    if not is_json_media_type(request.headers.get("content-type")):
        raise UnsupportedMediaType("Expected a JSON body (Content-Type: application/json)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise TooLarge(f"JSON body exceeds the limit of {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise TooLarge(f"JSON body exceeds the limit of {max_bytes} bytes")
    request._body = bytes(body)  # what Request.body() returns from now on
    return request._body


class JSONBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def guarded(request: Request) -> Response:
            await read_json_body(request, request.app.state.settings.max_json_bytes)
            return await handler(request)

        return guarded


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
        if name == b"transfer-encoding":
            return True
    return False


class CloseUnreadBodyMiddleware:
    """A response that starts before the request body was read to its end (an upload refused at the size cap,
    a 401/415 before the body is looked at) closes the connection: otherwise the server goes on receiving, and
    discarding, whatever the client still sends, however large, only to reuse the connection."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        read_all = False

        async def _receive() -> Message:
            nonlocal read_all
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                read_all = True
            return message

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start" and not read_all:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, _receive, _send)
