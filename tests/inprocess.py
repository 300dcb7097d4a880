"""The in-process tier: `create_app(...)` behind httpx.ASGITransport with its lifespan running, the model on a thread.

Routes, error shapes and metrics are tested here, with values read from the app's own registry; real subprocess
servers stay for what needs them (the worker process, signals, the HTTP protocol, parity with this tier).

>>> async with running_app(artifact_dir, drift_window=16) as app:
...     r = await app.client.post("/v1/predict", json={"instances": [[0.0] * 784]})
...     app.sample("bnserve_http_requests_total", route="/v1/predict", method="POST", status="200")
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI

from service.app import create_app
from service.serving.state import ServingState
from service.settings import Settings

LOAD_TIMEOUT = 120.0


@dataclass
class RunningApp:
    app: FastAPI
    client: httpx.AsyncClient

    @property
    def state(self) -> ServingState:
        state: ServingState = self.app.state.serving
        return state

    def sample(self, name: str, /, **labels: str) -> float:
        """A sample's value from the app's registry (0 when absent)."""
        value = self.app.state.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)


@contextlib.asynccontextmanager
async def running_app(artifact_dir: Path, *, wait_ready: bool = True, **settings: object) -> AsyncIterator[RunningApp]:
    """An app with its model on a thread of this process (`inference_process=False`), loaded and ready."""
    app = create_app(Settings(artifact_dir=artifact_dir, inference_process=False, **settings))  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        state: ServingState = app.state.serving
        if wait_ready:
            async with asyncio.timeout(LOAD_TIMEOUT):
                while state.model is None:
                    if state.load_error is not None:
                        raise RuntimeError(f"the model did not load: {state.load_error}")
                    await asyncio.sleep(0.02)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bnserve.test", timeout=30) as client:
            yield RunningApp(app, client)
