"""FastAPI dependencies: the app's serving state, request bodies with limits, and admin authentication."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.api.errors import ApiError
from service.serving.state import ServingState


async def get_state(request: Request) -> ServingState:
    # async on purpose: FastAPI runs a sync dependency in its threadpool, a thread hop on every request.
    state: ServingState = request.app.state.serving
    return state


StateDep = Annotated[ServingState, Depends(get_state)]


def media_type(content_type: str) -> str:
    """A Content-Type header's media type, lower-case, without its parameters (charset, boundary)."""
    return content_type.split(";")[0].strip().lower()


def require_json(content_type: str) -> None:
    """415 unless the Content-Type is application/json (parameters such as charset are allowed)."""
    if media_type(content_type) != "application/json":
        shown = content_type[:60] or "none"
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, got {shown}")


async def json_body(request: Request) -> bytes:
    """The raw body of a JSON request; 415 for any other content type (the size limit is in middleware)."""
    require_json(request.headers.get("content-type", ""))
    return await request.body()


JsonBody = Annotated[bytes, Depends(json_body)]


async def require_admin(request: Request, state: StateDep) -> None:
    """Bearer-token check, in constant time. Without a configured token admin routes do not exist (404)."""
    token = state.settings.admin_token
    if token is None:
        raise ApiError(404, "not_found", "admin routes are disabled: set BNSERVE_ADMIN_TOKEN to enable them")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise ApiError(401, "unauthorized", "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


AdminDep = Depends(require_admin)
