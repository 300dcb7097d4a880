"""The HTTP ceiling: bnserve's HTTP stack and body parsing into a numpy array, with no model at all."""

from __future__ import annotations

import numpy as np
from fastapi import FastAPI, Request

from service.api.responses import OrjsonResponse
from service.api.v1_schema import parse_predict_body

app = FastAPI()
_FAKE = np.full(10, 0.1, dtype=np.float32)


@app.post("/v1/predict")
async def predict(request: Request) -> OrjsonResponse:
    pixels = parse_predict_body(await request.body(), max_instances=64)
    preds = [{"label": 0, "class_name": "0", "confidence": 0.1, "probabilities": _FAKE} for _ in range(len(pixels))]
    return OrjsonResponse({"model": {"name": "none", "version": "none"}, "predictions": preds})
