"""The app factory: `create_app(settings)` wires settings, metrics, the model and the routes together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from service.errors import install_error_handlers
from service.fastpath import PredictFastPath
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.routes import health, v1, v2
from service.settings import Settings
from service.state import ServingState
from service.watch import watch_artifact

logger = logging.getLogger("service")

UPLOAD_PATHS = ("/v1/predict/image",)


def create_app(settings: Settings) -> FastAPI:
    """Build one independent app: its own registry, state and model. Nothing happens at import time.

    >>> app = create_app(Settings(artifact_dir=Path("artifacts/mnist-bn")))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServingState(settings, metrics)
        app.state.serving = state
        state.batcher.start()
        loader = asyncio.create_task(state.load_initial())
        watcher = asyncio.create_task(watch_artifact(state)) if settings.reload_poll_seconds > 0 else None
        try:
            yield
        finally:
            for task in (loader, watcher):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await state.batcher.stop()  # finishes every accepted request first

    app = FastAPI(
        title="bnserve",
        summary="MNIST predictions with per-layer BatchNorm drift monitoring",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(v2.router)
    if settings.fast_path:
        app.add_middleware(PredictFastPath, route=v1.predict_route)  # innermost: the middleware below still apply
    upload_limit = max(settings.max_body_bytes, settings.max_image_files * 8 * 1024 * 1024)
    app.add_middleware(
        BodyLimitMiddleware,
        limit_for=lambda path: upload_limit if path in UPLOAD_PATHS else settings.max_body_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
