"""`python -m service`: serve the artifact with uvicorn (uvloop + httptools), one process per model copy."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.http.protocol import ServingHttpProtocol
from service.http.server import GracefulServer, close_connections_when_exiting
from service.settings import Settings

logger = logging.getLogger("service")
STARTUP_FAILURE = 3  # what `uvicorn.run` exits with when the server never started


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """After its graceful shutdown uvicorn raises SIGTERM again under the previous handler; with the default one
    the process would die with status -15 (143 in a container), which process managers report as a failure.
    A repeated SIGTERM during interpreter teardown is ignored for the same reason."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(0)


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as exc:  # one clear message, no traceback; values are never shown (hide_input_in_errors)
        problems = "; ".join(f"BNSERVE_{'.'.join(map(str, e['loc'])).upper() or '*'}: {e['msg']}" for e in exc.errors())
        print(f"bnserve: invalid settings: {problems}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        loop="uvloop",
        http=ServingHttpProtocol.configured(
            max_head_bytes=settings.max_header_bytes,
            read_timeout=settings.read_timeout,
            max_connections=settings.max_connections,
        ),
        timeout_graceful_shutdown=30,
        server_header=False,
        proxy_headers=False,
    )
    server = GracefulServer(config)
    config.app = close_connections_when_exiting(app, server)
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: uvicorn shut down gracefully, then re-raised SIGINT
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
