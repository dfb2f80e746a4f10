"""A cap on request bodies: a body larger than the limit gets a 413 before the app sees any of it.

A declared Content-Length over the limit is refused without reading the body; otherwise the body is read
here, counting as it arrives (a chunked body declares no length), and handed on whole: FastAPI reads
whole bodies anyway. Without the cap, one client could make the server parse and tokenize any amount.
"""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ApiError, error_response


class BodyLimit:
    """ASGI middleware refusing request bodies larger than `max_body` bytes with a 413."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.max_body:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                await self._refuse(scope, receive, send)
                return
            more = message.get("more_body", False)
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()  # what follows the body: a disconnect
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(413, f"the request body is larger than {self.max_body} bytes, the most this server accepts")
        await error_response(scope["path"], error)(scope, receive, send)
