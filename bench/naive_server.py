"""The naive baseline: a tutorial-style FastAPI server (pydantic list[float], sync endpoint, one forward per request)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from fastapi import FastAPI
from pydantic import BaseModel

from model.artifact import load_artifact

art = load_artifact(Path(os.environ.get("BNSERVE_ARTIFACT_DIR", "artifacts/mnist-bn")))
app = FastAPI()


class PredictRequest(BaseModel):
    instances: list[list[float]]


@app.post("/v1/predict")
def predict(req: PredictRequest) -> dict[str, list[dict[str, object]]]:
    x = torch.tensor(req.instances).view(-1, 1, 28, 28)
    with torch.no_grad():
        probs = torch.softmax(art.net(art.normalization.apply(x)), dim=1)
    return {"predictions": [{"label": int(p.argmax()), "probabilities": p.tolist()} for p in probs]}
