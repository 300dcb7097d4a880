"""The one JSON error shape, `{"error": message, "code": ..., "loc": [...]}`, and the handlers that produce it."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

logger = logging.getLogger("service.errors")

# `error` is a plain string, so V2 clients (which expect {"error": "..."}) read the same body as everyone else.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error", "code"],
    "properties": {
        "error": {"type": "string", "description": "what is wrong, and how to fix it"},
        "code": {"type": "string", "description": "machine-readable error code"},
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
    },
}


class ApiError(Exception):
    """An error with an HTTP status that is safe to show the client."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        loc: Sequence[str | int] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.loc = [_short(part) for part in loc]
        self.headers = dict(headers or {})


def error_response(
    status: int, code: str, message: str, loc: Sequence[str | int] = (), headers: Mapping[str, str] | None = None
) -> Response:
    body: dict[str, Any] = {"error": message, "code": code}
    if loc:
        body["loc"] = list(loc)
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def format_loc(loc: Sequence[str | int]) -> str:
    """("instances", 3, 17) → "instances[3][17]"."""
    out = ""
    for part in map(_short, loc):
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(part: str | int, limit: int = 40) -> str | int:
    """A location part cut short: keys are the client's, and a megabyte key must not come back twice."""
    return part[: limit - 3] + "..." if isinstance(part, str) and len(part) > limit else part


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
}


def error_for(exc: BaseException, where: str = "") -> Response:
    """The one place an exception becomes an error response, in the one shape. ApiError and Starlette's HTTP errors
    (404, 405, the body limit's 413 raised mid-body) answer as they say; a request that fails FastAPI's validation
    gets 422 naming the first problem; anything else is logged with its traceback (`where` names the request) and
    answered 500 with nothing leaked."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.loc, exc.headers)
    if isinstance(exc, StarletteHTTPException):
        code = _STATUS_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)
    if isinstance(exc, ClientDisconnect):  # nobody to answer; the request metrics count it as 499
        return Response(status_code=499)
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [p for p in first.get("loc", ()) if isinstance(p, str | int)]
        return error_response(422, "invalid_input", f"{format_loc(loc)}: {first['msg']}", loc)
    logger.error("unhandled error on %s", where or "a request", exc_info=exc)
    return error_response(500, "internal", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI sees, expected or not, through `error_for`."""

    async def handler(request: Request, exc: Exception) -> Response:
        return error_for(exc, f"{request.method} {request.url.path}")

    # ClientDisconnect has its own entry: an `Exception` handler runs in Starlette's ServerErrorMiddleware, which
    # re-raises after answering, and uvicorn would log a traceback for a client that merely went away.
    for kind in (ApiError, StarletteHTTPException, RequestValidationError, ClientDisconnect, Exception):
        app.add_exception_handler(kind, handler)


def error_responses(descriptions: Mapping[int, str], *codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the given status codes, all with the one error body schema."""
    return {
        c: {"description": descriptions[c], "content": {"application/json": {"schema": ERROR_SCHEMA}}} for c in codes
    }
