"""The predictor: one loaded artifact, its batched forward pass, and the drift monitor riding inside it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.artifact import Artifact, ArtifactError, load_artifact
from model.bnstats import BnStatsRecorder
from service.drift import DriftMonitor

logger = logging.getLogger("service.predictor")


@dataclass(frozen=True)
class Prediction:
    """Class probabilities of a request's images, and which model produced them."""

    probabilities: np.ndarray  # (N, classes) float32
    model_version: str


class Predictor:
    """Owns one verified model; `predict` runs one eval-mode forward pass with the BN hooks inside it.

    One thread calls `predict` at a time (the batcher's worker). A Predictor never changes its model: a reload
    builds a new Predictor, so in-flight batches finish on the one they started with.

    >>> p = Predictor.load(Path("artifacts/mnist-bn"), drift_window=256)
    >>> p.predict(np.zeros((2, 1, 28, 28), np.float32)).shape
    (2, 10)
    """

    def __init__(self, artifact: Artifact, *, drift_window: int | None, top_channels: int = 5) -> None:
        self.artifact = artifact
        self.name = artifact.meta.name
        self.version = artifact.meta.version
        self.class_names = list(artifact.meta.class_names)
        # channels-last (NHWC) convolutions are ~2× faster on CPU for batches ≥ 8 (bench/README.md).
        self._net = artifact.net.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._mean = float(artifact.normalization.mean)
        self._std = float(artifact.normalization.std)
        self.recorder: BnStatsRecorder | None = None
        self.monitor: DriftMonitor | None = None
        if drift_window is not None:
            if artifact.calibration is None:
                raise ArtifactError(f"{artifact.path} has no drift calibration; retrain or disable drift monitoring")
            self.recorder = BnStatsRecorder(self._net)
            self.monitor = DriftMonitor(
                self.recorder.references, artifact.calibration, window=drift_window, top_channels=top_channels
            )

    @property
    def ref(self) -> dict[str, str]:
        """How responses name this model: {"name": ..., "version": ...}."""
        return {"name": self.name, "version": self.version}

    @classmethod
    def load(cls, path: Path, *, drift_window: int | None, top_channels: int = 5) -> Predictor:
        """Load, verify and smoke-test an artifact; raises ArtifactError (or ValueError) if it is not servable."""
        predictor = cls(load_artifact(path), drift_window=drift_window, top_channels=top_channels)
        predictor.self_test()
        return predictor

    def self_test(self) -> None:
        """A forward pass on a blank and a random image must give finite probabilities that sum to 1."""
        x = np.zeros((2, 1, 28, 28), np.float32)
        x[1] = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
        try:
            probs = self._forward(x, record=False)
        except RuntimeError as exc:  # e.g. a network built for other input than 1×28×28 images
            raise ArtifactError(f"self-test forward pass failed: {exc}") from None
        if probs.shape != (2, len(self.class_names)) or not np.isfinite(probs).all():
            raise ArtifactError(f"self-test forward pass gave invalid output of shape {probs.shape}")
        if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
            raise ArtifactError("self-test forward pass gave probabilities that do not sum to 1")

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8, 64)) -> None:
        """Run a few forward passes so the first requests do not pay for lazy initialisation."""
        for n in batch_sizes:
            self._forward(np.zeros((n, 1, 28, 28), np.float32), record=False)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 1, 28, 28) float32 pixels in [0, 1] → (N, classes) float32 probabilities; feeds the drift window."""
        return self._forward(pixels, record=self.monitor is not None)

    def _forward(self, pixels: np.ndarray, *, record: bool) -> np.ndarray:
        x = torch.from_numpy(pixels)  # shares memory: no copy
        with torch.inference_mode():
            x = ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
            if record and self.recorder is not None and self.monitor is not None:
                with self.recorder.capture() as moments:
                    logits = self._net(x)
                self.monitor.update(moments)
            else:
                logits = self._net(x)
            return torch.softmax(logits, dim=1).numpy()
