"""uvicorn's server with a graceful drain: no request a keep-alive client has already sent is dropped at SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("service")


class GracefulServer(uvicorn.Server):
    """Uvicorn's server with a shutdown that drops no request a keep-alive client has already sent.

    On SIGTERM uvicorn closes the listener, lets busy connections finish, and closes idle keep-alive connections
    at once; a request a client has just written to one of those is lost (the client sees a reset). Here the
    listener closes at once too, but every response from then on carries `Connection: close` (see
    `close_connections_when_exiting`), so each connection ends right after its next response. Idle connections
    get until the keep-alive timeout to send one; only then does uvicorn's own shutdown (and the lifespan, which
    drains the batcher) run.
    """

    draining = False  # set once the listener is closed

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections
        self.draining = True
        logger.info("listener closed; draining %d connections", len(self.server_state.connections))
        deadline = time.monotonic() + self.config.timeout_keep_alive + 1.0
        while self.server_state.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await super().shutdown(sockets)


def close_connections_when_exiting(app: ASGIApp, server: GracefulServer) -> ASGIApp:
    """Once the listener is closed, ask the client to close the connection after each response.

    Not earlier (at the signal): a client told to close would reconnect while the listener is still open, and a
    connection waiting in the kernel's accept queue when the listener closes is reset.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and server.draining:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await app(scope, receive, send_closing)

    return wrapped
