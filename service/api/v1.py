"""The bnserve API: predictions from pixels or images, the drift report, and admin actions."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from model.image import ImageError, preprocess_image_bytes
from service.api.deps import AdminDep, JsonBody, StateDep, media_type
from service.api.errors import ApiError, error_responses
from service.api.responses import OrjsonResponse
from service.api.v1_schema import ImagePredictResponse, PredictRequest, PredictResponse, parse_predict_body
from service.serving.state import Prediction, ServingState

router = APIRouter(prefix="/v1")


_V1_ERRORS = {
        400: "malformed request", 401: "missing or wrong bearer token", 404: "not found (or admin disabled)",
        413: "body too large", 415: "wrong content type", 422: "invalid input: the message says what and where",
        503: "not ready or overloaded (see Retry-After)", 504: "deadline exceeded",
    }  # fmt: skip


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return error_responses(_V1_ERRORS, *codes)


def _body(prediction: Prediction, names: list[str] | None = None) -> dict[str, Any]:
    """The response body, built from the model that computed the probabilities (a reload may have swapped it)."""
    model = prediction.model
    probs = prediction.probabilities
    labels = probs.argmax(axis=1)
    preds = []
    for i, (label, row) in enumerate(zip(labels.tolist(), probs, strict=True)):
        item = {
            "label": label,
            "class_name": model.class_names[label],
            "confidence": float(row[label]),
            "probabilities": row,
        }
        if names is not None:
            item["filename"] = names[i]
        preds.append(item)
    return {"model": model.ref, "predictions": preds}


@router.post(
    "/predict",
    tags=["predict"],
    response_model=PredictResponse,
    response_class=OrjsonResponse,
    responses=_errors(400, 413, 415, 422, 503, 504),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        }
    },
)
async def predict(body: JsonBody, state: StateDep) -> OrjsonResponse:
    """Classify one or more 28×28 images given as pixel values in [0, 1]."""
    return await answer_predict(state, body)


predict_route = next(r for r in router.routes if isinstance(r, APIRoute) and r.path == "/v1/predict")


async def answer_predict(state: ServingState, body: bytes) -> OrjsonResponse:
    """POST /v1/predict after the Content-Type check; shared by this route and `service.fastpath`."""
    pixels = parse_predict_body(body, max_instances=state.settings.max_instances)
    return OrjsonResponse(_body(await state.predict(pixels)))


_IMAGE_SCHEMA = {
    "type": "object",
    "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
}


@router.post(
    "/predict/image",
    tags=["predict"],
    response_model=ImagePredictResponse,
    response_class=OrjsonResponse,
    responses=_errors(400, 413, 415, 422, 503, 504),
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _IMAGE_SCHEMA}}}},
)
async def predict_image(request: Request, state: StateDep) -> OrjsonResponse:
    """Classify uploaded images (PNG, JPEG, BMP, GIF first frame), MNIST-style preprocessed."""
    s = state.settings
    if media_type(request.headers.get("content-type", "")) != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "upload images as multipart/form-data with field 'files'")
    try:
        form = await request.form(max_files=s.max_image_files, max_fields=8)
    except MultiPartException as exc:
        raise ApiError(400, "bad_multipart", f"multipart body refused: {exc.message}") from None
    except StarletteHTTPException as exc:  # how Starlette re-raises a MultiPartException; a 413 passes through
        if exc.status_code != 400:
            raise
        raise ApiError(400, "bad_multipart", f"multipart body refused: {exc.detail}") from None
    try:
        uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not uploads:
            raise ApiError(
                422, "invalid_input", "no files: send one or more images in the 'files' field", loc=["files"]
            )
        names, blobs = [], []
        for upload in uploads:
            names.append(upload.filename or "")
            blobs.append(await upload.read())
    finally:
        await form.close()
    images = []
    for i, blob in enumerate(blobs):
        try:
            images.append(await asyncio.to_thread(preprocess_image_bytes, blob, max_pixels=s.max_image_pixels))
        except ImageError as exc:
            raise ApiError(422, "invalid_image", f"files[{i}] ({names[i][:60]}): {exc}", loc=["files", i]) from None
    pixels = np.stack(images)[:, None].astype(np.float32)  # (N, 1, 28, 28)
    return OrjsonResponse(_body(await state.predict(pixels), names))


@router.get("/drift", tags=["drift"], response_class=OrjsonResponse, responses=_errors(503))
async def drift(state: StateDep) -> OrjsonResponse:
    """Per-layer BN-statistic drift of the current window against the training references."""
    model = state.require_model()
    report = await model.drift_report()
    if report is None:
        return OrjsonResponse({"enabled": False, "model": model.ref})
    return OrjsonResponse({"enabled": True, "model": model.ref, **report.to_dict()})


# bearer token; without one configured these routes answer 404
_ADMIN: dict[str, Any] = {"tags": ["admin"], "dependencies": [AdminDep], "response_class": OrjsonResponse}


@router.post("/drift/reset", **_ADMIN, responses=_errors(401, 404, 503))
async def drift_reset(state: StateDep) -> OrjsonResponse:
    """Start a new, empty drift window (bearer token; 404 when admin is disabled)."""
    model = state.require_model()
    await model.reset_drift()
    return OrjsonResponse({"status": "reset", "model": model.ref})


@router.post("/admin/reload", **_ADMIN, responses=_errors(401, 404, 422))
async def admin_reload(state: StateDep) -> OrjsonResponse:
    """Reload the artifact: verify it beside the current model, then swap atomically (bearer token)."""
    new = await state.reload()
    return OrjsonResponse(
        {"status": "reloaded", "model": {"name": new.name, "version": new.version, "sha256": new.sha256}}
    )
