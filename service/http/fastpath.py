"""POST /v1/predict in pure ASGI: the hot route past FastAPI's routing, dependency and exception layers.

At 32 concurrent clients the event loop is the bottleneck, and a py-spy profile put more than half of its time per
prediction outside the endpoint: route matching, dependency solving, the exception and exit-stack layers, each with
its own `send` wrapper (bench/HISTORY.md). This middleware answers the one hot route itself, with the same code as
the FastAPI route (`answer_predict`), the same checks in the same order, and the same error bodies; the route stays
registered for OpenAPI and serves the requests when `fast_path` is off. `tests/integration/test_fast_path.py`
checks that both answer byte for byte alike.

It sits inside the metrics, body-limit and content-coding middleware, so those apply unchanged, and before
FastAPI's routing (service/app.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.deps import require_json
from service.api.errors import error_for
from service.api.v1 import answer_predict
from service.http.middleware import HttpMiddleware, read_body
from service.serving.state import ServingState

logger = logging.getLogger("service.fastpath")


class PredictFastPath(HttpMiddleware):
    """Serves POST to `route`'s path directly; everything else goes on to the app."""

    def __init__(self, app: ASGIApp, *, route: APIRoute, state: Callable[[], ServingState]) -> None:
        super().__init__(app)
        self.route = route
        self.path = route.path
        self.state = state

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # what the router would set: metrics label requests by it
        try:
            response = await self._answer(scope, receive)
        except ClientDisconnect:
            return  # nobody to answer
        await response(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive) -> Response:
        try:
            content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            require_json(content_type.decode("latin-1"))
            body = await read_body(receive)
            return await answer_predict(self.state(), body)
        except ClientDisconnect:
            raise
        except Exception as exc:  # the body limit's 413 is raised from `receive` mid-body
            return error_for(exc, f"POST {self.path}")
