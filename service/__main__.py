"""`python -m service`: serve the artifact with uvicorn (uvloop + httptools), one process per model copy."""

from __future__ import annotations

import logging

import uvicorn

from service.app import create_app
from service.settings import Settings


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=30,
        server_header=False,
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
