"""Shared-secret check for every request, done before routing or body parsing.

basilisk (and every path outside /v1): the raw `Authorization` header must equal the secret, else 403.
OpenAI (/v1): `Authorization: Bearer <secret>`; a missing or wrong key is a 401 with OpenAI's error body,
as OpenAI answers. GET /health needs no secret: it tells only that the server is up. Comparisons use
hmac.compare_digest, whose time does not depend on where the strings differ.
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import OPENAI_PREFIX, ApiError, error_response
from server.health import HEALTH_PATH


def openai_key_matches(header: bytes, secret: bytes) -> bool:
    scheme, _, token = header.partition(b" ")
    return hmac.compare_digest(scheme.lower(), b"bearer") & hmac.compare_digest(token.strip(), secret)


class SharedSecretAuth:
    """ASGI middleware refusing requests whose Authorization header does not carry the shared secret."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.secret = secret.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._check(scope)
        if error is None:
            await self.app(scope, receive, send)
        else:
            await error_response(scope["path"], error)(scope, receive, send)

    def _check(self, scope: Scope) -> ApiError | None:
        header = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        path = scope["path"]
        if path == HEALTH_PATH:
            return None
        if path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/"):
            if header is None:
                return ApiError(401, "missing API key: send 'Authorization: Bearer <secret>'", code="invalid_api_key")
            if not openai_key_matches(header, self.secret):
                return ApiError(401, "incorrect API key", code="invalid_api_key")
            return None
        if header is None or not hmac.compare_digest(header, self.secret):
            return ApiError(403, "unauthorized")
        return None
