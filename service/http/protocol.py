"""uvicorn's httptools protocol, with a limit on a request's head and one write per response.

**One write per response.** uvicorn writes a response's head when the app sends `http.response.start` and its
body at `http.response.body`: two `send` system calls and two TCP segments per response. Each request's cycle here
writes through `_OneWrite`, which holds the head until the first body write and sends both as one (and the head
alone if no body write comes: a HEAD request, a closed connection). Paired runs at c=32: 1.04× the throughput
(bench/README.md); on loopback the one write costs the loop what the two did, so the gain is the client's one
segment and wake-up, and on a real network one packet fewer per response.

**A limit on a request's head** (request line and headers): 431 past it.

httptools has no such limit, and it gathers each header in memory until the header ends, so without one a client
could send a header that never ends and grow the server's memory without bound. (uvicorn's h11 protocol caps a head
at 16 KiB; Node's and nginx's defaults are 16 and 32 KiB.) Two checks:

- a head that has arrived whole is measured from the parser's callbacks (the URL, each header's name and value);
  past the limit, `on_headers_complete` raises, so no request is made of it;
- a head still incomplete after a read from the socket counts every byte read since it began (less the read it
  began in, if a request ended in that one), so the memory held for a head stays under the limit plus two reads.

The answer follows the service's one error shape, and the connection closes: the rest of the head is never read.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

HEADER_OVERHEAD = 4  # ": " and CRLF around each header's name and value


class HeadTooLargeError(Exception):
    """Raised from a parser callback; the parser turns it into HttpParserCallbackError, and uvicorn into a 400,
    which `send_400_response` turns into the 431."""


class ServingHttpProtocol(HttpToolsProtocol):
    """See the module docstring; `limited(max_head_bytes)` makes the class uvicorn's `Config(http=...)` takes."""

    max_head_bytes = 32 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # a connection starts with a request's head
        self._head_read = 0  # bytes read while the head was incomplete
        self._head_size = 0  # bytes of the head's URL and headers, as the parser gave them
        self._head_too_large = False
        self._message_ended = False  # a request ended during this read

    @classmethod
    def limited(cls, max_head_bytes: int) -> type[ServingHttpProtocol]:
        return type(cls.__name__, (cls,), {"max_head_bytes": max_head_bytes})

    def data_received(self, data: bytes) -> None:
        self._message_ended = False
        super().data_received(data)
        if not self._reading_head or self._message_ended or self.transport.is_closing():
            return  # a read that completes a head, or ends a body, does not count: most of it is not this head
        self._head_read += len(data)
        if self._head_read > self.max_head_bytes:
            self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + HEADER_OVERHEAD
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_read = 0
        if self._head_size > self.max_head_bytes:
            self._head_too_large = True
            raise HeadTooLargeError
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not before:  # a request (not a WebSocket upgrade): its answer, one write
            one_write = _OneWrite(self.transport, cycle)
            cycle.transport = one_write  # type: ignore[assignment]  # what a cycle uses of a transport, it has
            on_response = cycle.on_response

            def flush_then_on_response() -> None:
                one_write.flush()
                on_response()

            cycle.on_response = flush_then_on_response

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True  # what comes next on this connection is the next request's head
        self._message_ended = True

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def _refuse_head(self) -> None:
        self.logger.warning("a request head over %d bytes refused (431)", self.max_head_bytes)
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # mid-response to an earlier request: no answer can be slotted in
            return
        body = orjson.dumps(
            {
                "error": f"the request line and headers are larger than the {self.max_head_bytes}-byte limit",
                "code": "request_header_fields_too_large",
            }
        )
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()


class _OneWrite:
    """A request cycle's transport: the first write after the response has started (its head) waits for the next
    one, and both go out together. `flush` (the response is complete) and `close` write what is held. Writes before
    the response starts (`100 Continue`) and after the first body write pass straight through."""

    __slots__ = ("_cycle", "_head", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        self._cycle = cycle
        self._head: bytes | None = b""  # b"": not come yet; bytes: waiting; None: gone out

    def write(self, data: bytes) -> None:
        head = self._head
        if head:
            data, self._head = head + data, None
        elif head is not None and self._cycle.response_started and not self._cycle.response_complete:
            self._head = data  # the response's head (never empty: it holds the status line)
            return
        self._transport.write(data)

    def flush(self) -> None:
        head, self._head = self._head, None
        if head:
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, ...: the transport's own
        return getattr(self._transport, name)
