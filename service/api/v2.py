"""The Open Inference Protocol V2 (KServe/Triton REST): health, metadata and inference on the shared batcher."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from model.preprocess import IMAGE_SIDE
from service.api.deps import JsonBody, StateDep
from service.api.errors import ApiError, error_responses
from service.api.parsing import describe_value
from service.api.responses import OrjsonResponse
from service.api.v2_schema import (
    BINARY_UNSUPPORTED,
    INPUT_NAME,
    PLATFORM,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ParsedInference,
    ServerMetadata,
    parse_infer_body,
)
from service.serving.handle import ModelHandle
from service.serving.state import Prediction, ServingState

router = APIRouter(prefix="/v2", tags=["v2"])


def _infer_body(prediction: Prediction, parsed: ParsedInference) -> dict[str, Any]:
    probs = prediction.probabilities  # (N, classes) float32
    tensors = {
        "probabilities": {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape), "data": probs.ravel()},
        "label": {"name": "label", "datatype": "INT64", "shape": [len(probs)], "data": probs.argmax(axis=1).astype(np.int64)},
    }  # fmt: skip
    body: dict[str, Any] = {"model_name": prediction.model.name, "model_version": prediction.model.version}
    if parsed.id is not None:
        body["id"] = parsed.id
    body["outputs"] = [tensors[name] for name in parsed.outputs]
    return body


def _model(state: ServingState, name: str, version: str | None) -> ModelHandle:
    """The served model if `name` (and `version`, when given) is it; 404 otherwise, 503 while none is loaded."""
    model = state.require_model()
    if name != model.name:
        raise ApiError(
            404, "model_not_found", f"unknown model {describe_value(name)}; this server serves {model.name!r}"
        )
    if version is not None and version != model.version:
        raise ApiError(
            404, "version_not_found",
            f"model {model.name!r} has no version {describe_value(version)}; the served version is {model.version!r}",
        )  # fmt: skip
    return model


def _model_metadata(p: ModelHandle) -> dict[str, Any]:
    return {
        "name": p.name,
        "versions": [p.version],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 1, IMAGE_SIDE, IMAGE_SIDE]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(p.class_names)]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
    }


_V2_ERRORS = {
        400: "invalid request: the message says what and where", 404: "unknown model or version",
        413: "body too large", 415: "wrong content type", 503: "not ready or overloaded (see Retry-After)",
        504: "deadline exceeded",
    }  # fmt: skip


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return error_responses(_V2_ERRORS, *codes)


def _refuse_binary_header(request: Request) -> None:
    """Binary-extension requests are not JSON at all, so refuse them before the content type is checked."""
    if "inference-header-content-length" in request.headers:
        raise ApiError(400, "binary_data_unsupported", BINARY_UNSUPPORTED)


_NOT_READY: dict[int | str, dict[str, Any]] = {400: {"description": "false: not ready (the body is empty)"}}


@router.get("", response_model=ServerMetadata, response_class=OrjsonResponse)
async def server_metadata(request: Request) -> OrjsonResponse:
    """Server metadata: name, version and the protocol extensions supported (none)."""
    return OrjsonResponse({"name": "bnserve", "version": request.app.version, "extensions": []})


@router.get("/health/live", response_class=Response)
async def server_live() -> Response:
    """Server live: 200 (empty body) while the process answers."""
    return Response(status_code=200)


@router.get("/health/ready", response_class=Response, responses=_NOT_READY)
async def server_ready(state: StateDep) -> Response:
    """Server ready: 200 once the model is loaded, 400 (both with empty bodies) before that."""
    return Response(status_code=200 if state.model is not None else 400)


@router.get("/models/{name}", response_model=ModelMetadata, response_class=OrjsonResponse, responses=_errors(404, 503))
async def model_metadata(name: str, state: StateDep) -> OrjsonResponse:
    """Model metadata. The input is listed as FP32 [-1, 1, 28, 28]; UINT8 and [N, 28, 28] or [N, 784] work too."""
    return OrjsonResponse(_model_metadata(_model(state, name, None)))


@router.get(
    "/models/{name}/versions/{version}",
    response_model=ModelMetadata,
    response_class=OrjsonResponse,
    responses=_errors(404, 503),
)
async def model_version_metadata(name: str, version: str, state: StateDep) -> OrjsonResponse:
    """Model metadata of one version (only the served version exists)."""
    return OrjsonResponse(_model_metadata(_model(state, name, version)))


def _ready(state: ServingState, name: str, version: str | None) -> Response:
    if state.model is None:
        return Response(status_code=400)  # nothing is loaded, so no model is ready
    _model(state, name, version)
    return Response(status_code=200)


@router.get("/models/{name}/ready", response_class=Response, responses={**_NOT_READY, **_errors(404)})
async def model_ready(name: str, state: StateDep) -> Response:
    """Model ready: 200 if this is the served model and it is loaded; 404 for another model name."""
    return _ready(state, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready", response_class=Response, responses={**_NOT_READY, **_errors(404)}
)
async def model_version_ready(name: str, version: str, state: StateDep) -> Response:
    """Model version ready: 200 if this model and version are loaded; 404 for another name or version."""
    return _ready(state, name, version)


async def _infer(state: ServingState, body: bytes, name: str, version: str | None) -> OrjsonResponse:
    _model(state, name, version)
    parsed = parse_infer_body(body, max_instances=state.settings.max_instances)
    prediction = await state.predict(parsed.pixels)  # the same batcher and drift window as /v1
    if version is not None and prediction.model.version != version:
        raise ApiError(
            404, "version_not_found",
            f"version {describe_value(version)} was replaced by {prediction.model.version!r} while the request waited",
        )  # fmt: skip
    return OrjsonResponse(_infer_body(prediction, parsed))


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its $defs put in place, so that it can sit inside the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(item) for item in node] if isinstance(node, list) else node

    return resolve(schema)


_INFER: dict[str, Any] = {
    "response_model": InferenceResponse,
    "response_class": OrjsonResponse,
    "responses": _errors(400, 404, 413, 415, 503, 504),
    "dependencies": [Depends(_refuse_binary_header)],
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline_refs(InferenceRequest.model_json_schema())}},
        }
    },
}


@router.post("/models/{name}/infer", **_INFER)
async def infer(name: str, body: JsonBody, state: StateDep) -> OrjsonResponse:
    """Inference: one input tensor "input" (FP32 in [0, 1] or UINT8; [N, 1, 28, 28], [N, 28, 28] or [N, 784])."""
    return await _infer(state, body, name, None)


@router.post("/models/{name}/versions/{version}/infer", **_INFER)
async def infer_version(name: str, version: str, body: JsonBody, state: StateDep) -> OrjsonResponse:
    """Inference on one version (only the served version exists); same request and response as without it."""
    return await _infer(state, body, name, version)
