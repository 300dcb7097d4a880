"""The predictor: one loaded artifact, its batched forward pass, and the drift monitor riding inside it."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model.artifact import Artifact, ArtifactError, load_artifact
from model.bnstats import BnStatsRecorder
from model.net import fold_batchnorm
from service.drift_report import DriftReport
from service.inference.engine import Engine, TorchEngine, build_engine
from service.inference.heap import keep_model_heap_mapped
from service.inference.monitor import DriftMonitor
from service.inference.sampling import DriftSampler
from service.wire import EngineName, ModelConfig

logger = logging.getLogger("service.predictor")

ENGINE_TOLERANCE = 1e-4  # most a probability may differ between the serving engine and torch at the self-test


class Predictor:
    """Owns one verified, self-tested model; `predict` runs one eval-mode forward pass with the drift sums inside it.

    One thread calls `predict` at a time (the inference worker process's, or LocalHandle's thread). A Predictor
    never changes its model: a reload builds a new Predictor, so in-flight batches finish on the one they started
    with.

    >>> p = Predictor(load_artifact(Path("artifacts/mnist-bn")), drift_window=256)  # ArtifactError if unservable
    >>> p.predict(np.zeros((2, 1, 28, 28), np.float32)).shape
    (2, 10)
    """

    def __init__(
        self,
        artifact: Artifact,
        *,
        drift_window: int | None,
        top_channels: int = 5,
        drift_sample: float = 1.0,
        engine: EngineName = "onnxruntime",
    ) -> None:
        self.artifact = artifact
        self.name = artifact.meta.name
        self.version = artifact.meta.version
        self.class_names = list(artifact.meta.class_names)
        # channels-last (NHWC): faster convolutions on CPU for batches >= 8 (bench/HISTORY.md)
        self._net = artifact.net.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # each BN layer inside the convolution before it (in place: the Predictor owns the artifact's net); the
        # drift hooks still get the BN inputs' moments
        fold_batchnorm(self._net)
        self._mean = float(artifact.normalization.mean)
        self._std = float(artifact.normalization.std)
        self.recorder: BnStatsRecorder | None = None
        self._drift_lock = threading.Lock()
        self._sampler = DriftSampler(drift_sample)
        self.images_unmonitored = 0  # answered without feeding the drift window (DriftSampler)
        self.monitor: DriftMonitor | None = None
        if drift_window is not None:
            if artifact.calibration is None:
                raise ArtifactError(f"{artifact.path} has no drift calibration; retrain or disable drift monitoring")
            self.recorder = BnStatsRecorder(self._net)
            self.monitor = DriftMonitor(
                self.recorder.references, artifact.calibration, window=drift_window, top_channels=top_channels
            )
        self._torch = TorchEngine(self._net, self._mean, self._std, self.recorder)
        try:  # the onnxruntime engine exports the network: a forward pass on a 1×28×28 image
            self.engine: Engine = build_engine(
                engine, self._net, self._mean, self._std, self.recorder, threads=torch.get_num_threads()
            )
        except RuntimeError as exc:  # e.g. a network built for other input than 1×28×28 images
            raise ArtifactError(f"self-test forward pass failed (exporting for {engine}): {exc}") from None
        self.self_test()

    def self_test(self) -> None:
        """A forward pass on a blank and a random image must give finite probabilities that sum to 1, and the same
        ones (within ENGINE_TOLERANCE) from the serving engine as from torch."""
        x = np.zeros((2, 1, 28, 28), np.float32)
        x[1] = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
        try:
            probs = self.engine.forward(x)
        except RuntimeError as exc:  # e.g. a network built for other input than 1×28×28 images
            raise ArtifactError(f"self-test forward pass failed: {exc}") from None
        if probs.shape != (2, len(self.class_names)) or not np.isfinite(probs).all():
            raise ArtifactError(f"self-test forward pass gave invalid output of shape {probs.shape}")
        if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
            raise ArtifactError("self-test forward pass gave probabilities that do not sum to 1")
        if self.engine is not self._torch:
            off = float(np.abs(probs - self._torch.forward(x)).max())
            if not off <= ENGINE_TOLERANCE:
                raise ArtifactError(f"the {self.engine.name} engine's probabilities differ from torch's by {off:.2g}")

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8, 64)) -> None:
        """A few forward passes of each size (and monitored ones), so the first requests do not pay for lazy
        initialisation (onnxruntime sizes its buffers for each new batch size)."""
        for n in batch_sizes:
            blank = np.zeros((n, 1, 28, 28), np.float32)
            for _ in range(2):
                self.engine.forward(blank)
            if self.recorder is not None:
                self.engine.forward_with_moments(blank)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 1, 28, 28) float32 pixels in [0, 1] → (N, classes) float32 probabilities; feeds the drift window.

        A batch the sampler picks runs the engine's pass that also gives the moments of every BN layer's input (with
        onnxruntime, reductions inside the same graph); they go into the window before the batch is answered, so a
        drift report never misses an image already answered.
        """
        if self.recorder is None or self.monitor is None:
            return self.engine.forward(pixels)
        images = len(pixels)
        with self._drift_lock:
            monitored = self._sampler.decide(images, window_full=self.monitor.full)
        if monitored:
            probs, moments = self.engine.forward_with_moments(pixels)
        else:
            probs = self.engine.forward(pixels)
        with self._drift_lock:
            if monitored:
                self.monitor.update(moments)
            else:
                self.images_unmonitored += images
            self._sampler.done(images, monitored=monitored)
        return probs

    def drift_report(self) -> DriftReport | None:
        """The drift report over every image answered so far (None without monitoring)."""
        if self.monitor is None:
            return None
        return replace(self.monitor.report(), images_unmonitored=self.images_unmonitored)

    def reset_drift(self) -> None:
        """Start a new, empty drift window; images answered before the reset do not count."""
        if self.monitor is None:
            return
        with self._drift_lock:
            self.monitor.reset()


def load_predictor(config: ModelConfig) -> Predictor:
    """Load, verify, self-test and warm up the model; raises ArtifactError (or ValueError, OSError)."""
    keep_model_heap_mapped()  # activations stay mapped between forward passes
    torch.set_num_threads(config.torch_threads)
    artifact = load_artifact(Path(config.artifact_dir))
    if config.expect_sha256 is not None and artifact.sha256 != config.expect_sha256:
        raise ArtifactError(
            f"the artifact on disk (weights sha256 {artifact.sha256[:12]}…) is not the served model "
            f"({config.expect_sha256[:12]}…); reload it explicitly to serve it"
        )
    predictor = Predictor(
        artifact,
        drift_window=config.drift_window,
        top_channels=config.top_channels,
        drift_sample=config.drift_sample,
        engine=config.engine,
    )
    predictor.warmup()
    return predictor
