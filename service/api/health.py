"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from service.api.deps import StateDep
from service.api.errors import ERROR_SCHEMA, error_response
from service.api.responses import OrjsonResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_class=OrjsonResponse)
async def healthz() -> OrjsonResponse:
    """Liveness: the process answers HTTP."""
    return OrjsonResponse({"status": "alive"})


@router.get(
    "/readyz",
    response_class=OrjsonResponse,
    responses={503: {"description": "model not loaded yet", "content": {"application/json": {"schema": ERROR_SCHEMA}}}},
)
async def readyz(state: StateDep) -> Response:
    """Readiness: 200 once the model is loaded, verified and warmed up, else 503."""
    p = state.model
    if p is None:
        # the reason itself (with its paths) is in the server's log, never in a response
        reason = "the model failed to load; the server log says why" if state.load_error else "model is loading"
        return error_response(503, "not_ready", reason, headers={"Retry-After": "1"})
    if not p.alive:
        return error_response(
            503, "worker_restarting", "the inference worker is restarting", headers={"Retry-After": "2"}
        )
    return OrjsonResponse({"status": "ready", "model": p.ref})


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text exposition of this process's metrics."""
    await state.refresh_drift()
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
