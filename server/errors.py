"""Errors of both HTTP APIs: one exception type, rendered in OpenAI's shape under /v1 and as text elsewhere.

OpenAI's shape is `{"error": {"message", "type", "param", "code"}}`. basilisk clients expect a short text
body with the status (its original server answered "unauthorized" or "prompt required" that way).
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

OPENAI_PREFIX = "/v1"


class ApiError(Exception):
    """A request the server refuses: status code, one-line message, and (for OpenAI) the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def openai_error_body(error: ApiError) -> dict[str, Any]:
    kind = "server_error" if error.status >= 500 else "invalid_request_error"
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


def error_response(path: str, error: ApiError) -> Response:
    """The response for `error` in the style of the API that `path` belongs to."""
    if path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/"):
        return JSONResponse(openai_error_body(error), status_code=error.status)
    return PlainTextResponse(error.message, status_code=error.status)


BUILTIN_TAGS = {"str", "int", "float", "bool", "dict", "list"}


def _is_union_tag(part: object) -> bool:
    """pydantic names the member of a union that failed ('str', 'list[int]', 'ContentPart') in the error's
    location; field names are snake_case, so they never look like that."""
    return isinstance(part, str) and ("[" in part or part in BUILTIN_TAGS or part[:1].isupper())


def _body_loc(error: Any) -> list[Any]:
    return [part for part in error.get("loc", ()) if part != "body"]


def validation_error(exc: RequestValidationError) -> ApiError:
    """One clear 400 from pydantic's list of problems with a request body (the first one is reported)."""
    errors = exc.errors() or [{"type": "", "loc": (), "msg": "invalid request"}]
    first = errors[0]
    loc = _body_loc(first)
    if first["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
    if not loc:
        if first["type"] == "missing":
            return ApiError(400, "the request body is missing: send a JSON object")
        return ApiError(400, f"the request body must be a JSON object ({first['msg']})")
    tag_at = next((i for i, part in enumerate(loc) if _is_union_tag(part)), None)
    if tag_at is not None:  # every member of a union failed
        members = [e for e in errors if _body_loc(e)[:tag_at] == loc[:tag_at] and len(_body_loc(e)) > tag_at]
        # a member whose type fits but whose value breaks a rule says more than the list of types
        broken = next((e for e in members if not e["type"].endswith("_type")), None)
        if broken is None:
            field = ".".join(str(part) for part in loc[:tag_at])
            expected = ", ".join(dict.fromkeys(str(_body_loc(e)[tag_at]) for e in members))
            return ApiError(400, f"invalid value for '{field}': expected one of {expected}", param=field)
        first, loc = broken, [part for part in _body_loc(broken) if not _is_union_tag(part)]
    field = ".".join(str(part) for part in loc)
    if first["type"] == "missing":
        return ApiError(400, f"missing required field '{field}'", param=field)
    return ApiError(400, f"invalid value for '{field}': {first['msg']}", param=field)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return error_response(request.url.path, exc)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request.url.path, validation_error(exc))

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return error_response(request.url.path, ApiError(exc.status_code, str(message)))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}")
        return error_response(request.url.path, error)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
