"""Pure-ASGI middleware: request metrics by route template, the request-body size limit, and compressed bodies."""

from __future__ import annotations

import logging
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import ApiError, error_for
from service.metrics import Metrics

logger = logging.getLogger("service.http")


class BodyTooLargeError(HTTPException):
    """Raised from `receive` once a streamed body passes the limit, so nothing more of it is read."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the {limit}-byte limit")


class HttpMiddleware(ABC):
    """Pure-ASGI middleware for HTTP requests: other scopes (lifespan) go straight on to the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @abstractmethod
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One HTTP request."""


class BodyLimitMiddleware(HttpMiddleware):
    """413 for bodies over the limit: at once from Content-Length, or mid-stream for chunked uploads."""

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str], int]) -> None:
        super().__init__(app)
        self.limit_for = limit_for

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    refusal = (
                        ApiError(413, "payload_too_large", f"request body is larger than the {limit}-byte limit")
                        if value.isdigit()
                        else ApiError(400, "bad_request", "bad Content-Length")
                    )
                    response = error_for(refusal)
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


# Content codings a request body may arrive in, and the zlib window bits that decode each (RFC 9110 §8.4.1).
GZIP_WBITS = 16 + zlib.MAX_WBITS
REQUEST_CODINGS = {"gzip": GZIP_WBITS, "x-gzip": GZIP_WBITS, "deflate": zlib.MAX_WBITS}
ACCEPTED_CODINGS = "gzip, deflate, identity"


class ContentEncodingMiddleware(HttpMiddleware):
    """Request bodies sent with `Content-Encoding: gzip` (or deflate) are decompressed before anything reads them.

    Pixels as JSON compress 7-10:1, so a client may well send them compressed. A coding we do not decode gets 415
    with `Accept-Encoding` (RFC 9110 §15.5.16), not a JSON parse error about binary bytes; for the rest, see
    `decompress`. It sits inside the body limit, which caps the compressed body.
    """

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str], int]) -> None:
        super().__init__(app)
        self.limit_for = limit_for

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        codings = [
            c.strip().lower()
            for name, value in scope["headers"]
            if name == b"content-encoding"
            for c in value.decode("latin-1").split(",")
        ]
        codings = [c for c in codings if c not in ("", "identity")]
        if not codings:
            await self.app(scope, receive, send)
            return
        try:
            if len(codings) > 1 or codings[0] not in REQUEST_CODINGS:
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    f"Content-Encoding {', '.join(codings)[:60]} is not supported; send the body as gzip, deflate or "
                    "identity",
                    headers={"Accept-Encoding": ACCEPTED_CODINGS},
                )
            plain = decompress(await read_body(receive), codings[0], self.limit_for(scope["path"]))
        except ClientDisconnect:
            return  # nobody to answer
        except Exception as exc:  # the body limit's 413 is raised from `receive` mid-body
            await error_for(exc, f"{scope['method']} {scope['path']}")(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
        headers.append((b"content-length", str(len(plain)).encode()))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: a disconnect, whenever the client goes
            replayed = True
            return {"type": "http.request", "body": plain, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)


def decompress(body: bytes, coding: str, limit: int) -> bytes:
    """`body` decoded from `coding` (a key of REQUEST_CODINGS). ApiError 413 once it passes `limit` bytes, found
    while decompressing at most limit + 1 of them (a few KB of gzip can expand to gigabytes); 400 if it is not valid
    or is cut short. A gzip body may hold several members one after another (RFC 1952 §2.2; `cat a.gz b.gz`)."""
    out = bytearray()
    rest = body
    while True:
        decoder = zlib.decompressobj(REQUEST_CODINGS[coding])
        try:
            out += decoder.decompress(rest, limit + 1 - len(out))  # ≥ 1: len(out) ≤ limit here
        except zlib.error as exc:
            raise ApiError(400, "bad_request", f"the request body is not valid {coding} data ({exc})") from None
        if len(out) > limit:
            raise ApiError(
                413, "payload_too_large", f"request body is larger than the {limit}-byte limit once decompressed"
            )
        if not decoder.eof:
            raise ApiError(400, "bad_request", f"the request body is cut short: its {coding} data does not end")
        rest = decoder.unused_data
        if not rest:
            return bytes(out)
        if REQUEST_CODINGS[coding] != GZIP_WBITS:
            raise ApiError(400, "bad_request", f"the request body has {len(rest)} bytes after its {coding} data")


async def read_body(receive: Receive) -> bytes:
    """The whole request body, like `Request.body()`; ClientDisconnect if the client goes away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before it could be answered
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


class MetricsMiddleware(HttpMiddleware):
    """Counts requests and observes latency by route template (never the raw path: bounded cardinality)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 0  # no answer yet
        gone = False  # the client disconnected

        async def receive_wrapper() -> Message:
            nonlocal gone
            message = await receive()
            gone |= message["type"] == "http.disconnect"
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            if not status:  # no answer: nobody to answer (nginx's 499), or the app died (what the client sees: 500)
                status = CLIENT_CLOSED if gone else 500
            if status == CLIENT_CLOSED:
                logger.info(
                    "%s %s: the client went away before its request was complete", scope["method"], scope["path"]
                )
            route = _route_template(scope)
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"  # a client's word: bounded
            labels = (route, method, str(status))
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
