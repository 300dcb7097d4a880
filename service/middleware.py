"""Pure-ASGI middleware: request metrics by route template, and the request-body size limit."""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response
from service.metrics import Metrics


class BodyTooLargeError(HTTPException):
    """Raised from `receive` once a streamed body passes the limit, so nothing more of it is read."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the {limit}-byte limit")


class BodyLimitMiddleware:
    """413 for bodies over the limit: at once from Content-Length, or mid-stream for chunked uploads."""

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    message = (
                        f"request body is larger than the {limit}-byte limit"
                        if value.isdigit()
                        else "bad Content-Length"
                    )
                    response = error_response(
                        413 if value.isdigit() else 400,
                        "payload_too_large" if value.isdigit() else "bad_request",
                        message,
                    )
                    response.headers["connection"] = "close"
                    await response(scope, receive, send)
                    return
                break
        received = 0
        # A body counts as unread until its last chunk arrives; GETs and empty bodies have none to read.
        body_unread = any(
            name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
            for name, value in scope["headers"]
        )

        async def limited_receive() -> Message:
            nonlocal received, body_unread
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
                body_unread = message.get("more_body", False)
            return message

        async def close_if_unread(message: Message) -> None:
            # An answer given before the body is read (413, 415, 401, a bad multipart header) closes the connection:
            # otherwise the server would keep reading, and discarding, whatever the client still sends.
            if message["type"] == "http.response.start" and body_unread:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited_receive, close_if_unread)


class MetricsMiddleware:
    """Counts requests and observes latency by route template (never the raw path: bounded cardinality)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app dies before answering, that is what the client sees

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = _route_template(scope)
            labels = (route, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    """The matched route's template; for requests answered before routing (413, 404), the path if it is a
    documented static route, else "unmatched" (so random paths cannot inflate label cardinality)."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return str(route.path)
    app = scope.get("app")
    static: frozenset[str] | None = getattr(app, "_bnserve_static_paths", None) if app is not None else None
    if static is None and app is not None and hasattr(app, "openapi"):
        static = frozenset(p for p in app.openapi().get("paths", {}) if "{" not in p)
        app._bnserve_static_paths = static
    return scope["path"] if static and scope["path"] in static else "unmatched"
