"""uvicorn's httptools protocol with the limits it lacks: a request's head and trailers, a read deadline, a
connection cap.

**A limit on a request's head** (request line and headers): 431 past it.

httptools has no such limit, and it gathers each header in memory until the header ends, so without one a client
could send a header that never ends and grow the server's memory without bound. (uvicorn's h11 protocol caps a head
at 16 KiB; Node's and nginx's defaults are 16 and 32 KiB.) Two checks:

- a head that has arrived whole is measured from the parser's callbacks (the URL, each header's name and value);
  past the limit, `on_headers_complete` raises, so no request is made of it;
- a head still incomplete after a read from the socket counts every byte read since it began (less the read it
  began in, if a request ended in that one), so the memory held for a head stays under the limit plus two reads.

**Trailers** (after a chunked body) go through the same header callbacks: they count against the same limit, as
do the bytes of reads that carry no body (chunk framing, a trailer line that never ends), and they are dropped.

**A read deadline**: a request that sends no byte of its head or body for `read_timeout` seconds gets 408 (its app,
if it began, sees the client go away), and a connection that never sends a request is closed; what either buffered
is freed. uvicorn has no such deadline.

**A connection cap**: past `max_connections`, a request gets 503 with Retry-After, in the error shape (uvicorn's
`limit_concurrency` answers in plain text).

Every answer follows the service's one error shape, and the connection closes: the rest is never read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_OVERHEAD = 4  # ": " and CRLF around each header's name and value


class HeadTooLargeError(Exception):
    """Raised from a parser callback; the parser turns it into HttpParserCallbackError, and uvicorn into a 400,
    which `send_400_response` turns into the 431."""


class ServingHttpProtocol(HttpToolsProtocol):
    """See the module docstring; `configured(...)` makes the class uvicorn's `Config(http=...)` takes."""

    max_head_bytes = 32 * 1024
    read_timeout = 30.0
    max_connections = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # a connection starts with a request's head
        self._head_read = 0  # bytes read while the head was incomplete
        self._head_size = 0  # bytes of the head's URL and headers, as the parser gave them
        self._head_too_large = False
        self._message_ended = False  # a request ended during this read
        self._in_message = False  # a request has begun and has not all arrived
        self._body_seen = False  # body bytes came in this read
        self._overhead = 0  # bytes read since the last body bytes while in the body: chunk framing and trailers
        self._read_timer: asyncio.TimerHandle | None = None

    @classmethod
    def configured(cls, *, max_head_bytes: int, read_timeout: float, max_connections: int) -> type[ServingHttpProtocol]:
        settings = {"max_head_bytes": max_head_bytes, "read_timeout": read_timeout, "max_connections": max_connections}
        return type(cls.__name__, (cls,), settings)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_timer()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._message_ended = self._body_seen = False
        super().data_received(data)
        if self.transport.is_closing():
            self._disarm_read_timer()
            return
        if self._in_message:
            self._arm_read_timer()  # progress: the deadline starts again
        else:
            self._disarm_read_timer()
        if self._message_ended:
            return  # a read that ends a body does not count: most of it is not a head or trailers
        if self._reading_head:
            self._head_read += len(data)
            if self._head_read > self.max_head_bytes:
                self._refuse_head()
        elif not self._body_seen:  # in a chunked body, a read with no body in it: chunk framing or trailers
            self._overhead += len(data)
            if self._overhead > self.max_head_bytes:
                self._refuse_trailers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0
        self._in_message = True

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + HEADER_OVERHEAD
        if self._reading_head:
            self._head_size += size
            super().on_header(name, value)
            return
        # a trailer (after a chunked body): counted against the same limit as the head, and dropped (uvicorn would
        # append it to the request's headers list, which the app has already read)
        self._overhead += size
        if self._overhead > self.max_head_bytes:
            self._refuse_trailers()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_read = 0
        self._overhead = 0
        if self._head_size > self.max_head_bytes:
            self._head_too_large = True
            raise HeadTooLargeError
        over_capacity = len(self.connections) > self.max_connections or len(self.tasks) >= self.max_connections
        app = self.app
        if over_capacity:  # uvicorn's own limit answers in plain text; this one in the service's error shape
            self.logger.warning("over %d connections: 503", self.max_connections)
            self.app = _over_capacity(self.max_connections)
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_body(self, body: bytes) -> None:
        self._body_seen = True
        self._overhead = 0
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True  # what comes next on this connection is the next request's head
        self._message_ended = True
        self._in_message = False
        self._overhead = 0
        self._disarm_read_timer()

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _arm_read_timer(self) -> None:
        self._disarm_read_timer()
        self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        """No byte of a request for `read_timeout` s: 408 (a request had begun) or a plain close (none had)."""
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server is not reading (the app has not taken the body yet): not a stall
            self._arm_read_timer()
            return
        if not self._in_message:
            self.transport.close()
            return
        self.logger.info("a request not received in full within %g s: 408, connection closed", self.read_timeout)
        message = f"the request was not received in full within {self.read_timeout:g} s"
        self._answer_and_close(408, "Request Timeout", "request_timeout", message, current=not self._reading_head)

    def _refuse_head(self) -> None:
        self.logger.warning("a request head over %d bytes refused (431)", self.max_head_bytes)
        message = f"the request line and headers are larger than the {self.max_head_bytes}-byte limit"
        self._answer_and_close(431, "Request Header Fields Too Large", "request_header_fields_too_large", message)

    def _refuse_trailers(self) -> None:
        self.logger.warning("chunk framing and trailers over %d bytes refused (431)", self.max_head_bytes)
        message = f"the request's trailers (or chunk framing) are larger than the {self.max_head_bytes}-byte limit"
        self._answer_and_close(
            431, "Request Header Fields Too Large", "request_header_fields_too_large", message, current=True
        )

    def _answer_and_close(self, status: int, reason: str, code: str, message: str, *, current: bool = False) -> None:
        """Answer in the one error shape and close the connection. `current`: the refused request is the cycle's
        (its body or trailers were being read), whose app is told the client went away; else the refused request
        has not begun a cycle, and an earlier response still under way leaves no room for an answer."""
        cycle = self.cycle
        if cycle is not None and (cycle.response_started if current else not cycle.response_complete):
            self.transport.close()  # a response is under way: no answer can be slotted in
            return
        if current and cycle is not None:
            cycle.disconnected = True  # the app's receive() returns http.disconnect; what it sends is dropped
            cycle.message_event.set()
        body = orjson.dumps({"error": message, "code": code})
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\n".encode() + b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()


def _over_capacity(limit: int) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    body = orjson.dumps(
        {"error": f"the server is at its limit of {limit} connections; retry shortly", "code": "overloaded"}
    )
    headers = [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close"),
    ]  # fmt: skip

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return answer
