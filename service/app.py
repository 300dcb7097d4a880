"""The app factory: `create_app(settings)` wires settings, metrics, the model and the routes together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from service.api import health, v1, v2
from service.api.errors import install_error_handlers
from service.http.fastpath import PredictFastPath
from service.http.middleware import BodyLimitMiddleware, ContentEncodingMiddleware, MetricsMiddleware
from service.metrics import Metrics
from service.serving.heap_trim import HeapTrimmer, trim_heap_periodically
from service.serving.state import ServingState
from service.serving.watch import watch_artifact
from service.settings import Settings

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
        trimmer = asyncio.create_task(trim_heap_periodically(HeapTrimmer()))
        try:
            yield
        finally:
            for task in (loader, watcher, trimmer):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await state.batcher.stop()  # finishes every accepted request first
            await state.close()

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

    def limit_for(path: str) -> int:
        """The most bytes a request body may hold, as sent and once decompressed."""
        return settings.max_upload_bytes if path in UPLOAD_PATHS else settings.max_body_bytes

    # the last added is the outermost: metrics see every request, then the body limit, then gzip decoding, then
    # the fast path answers POST /v1/predict before FastAPI's routing
    if settings.fast_path:
        app.add_middleware(PredictFastPath, route=v1.predict_route, state=lambda: app.state.serving)
    app.add_middleware(ContentEncodingMiddleware, limit_for=limit_for)
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
