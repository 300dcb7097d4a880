"""The predictor: one loaded artifact, its batched forward pass, and the drift monitor riding inside it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from model.artifact import Artifact, ArtifactError, load_artifact
from model.bnstats import BnStatsRecorder
from model.net import fold_batchnorm
from service.drift import DriftMonitor, DriftReport

logger = logging.getLogger("service.predictor")

DRIFT_CHUNK = 32  # images of small batches whose BN-input moments are computed together (see Predictor.predict)
INLINE_DRIFT_IMAGES = DRIFT_CHUNK // 2  # batches this big compute their moments during the forward pass


class DriftBudget:
    """Lets the drift work take at most `fraction` of the wall-clock time, whatever the load.

    The budget earns `fraction` × the time that passes, and drift work spends the time it took. A batch is
    monitored while the balance is not negative, so over any stretch of time the drift work stays within `fraction`
    of it, give or take one batch. Credit saved while idle is capped at `fraction` × `horizon`: after a quiet spell a
    burst is monitored in full only until that is spent. A lightly loaded server monitors every image (its drift
    work needs less than its share); once traffic would make the drift work take more (requests queue, or one client
    sends back to back), the window fills from an evenly spread sample instead of all of it. A fraction of 1
    monitors every image.
    """

    def __init__(
        self, fraction: float, *, horizon: float = 1.0, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError("the drift budget must be in (0, 1]")
        self.fraction = fraction
        self._cap = fraction * horizon  # seconds of drift work
        self._clock = clock
        self._earned_until = clock()
        self.balance = self._cap  # a server starts idle

    @property
    def unlimited(self) -> bool:
        return self.fraction >= 1.0

    def allows(self) -> bool:
        """Whether the next batch may be monitored."""
        if self.unlimited:
            return True
        now = self._clock()
        self.balance = min(self._cap, self.balance + self.fraction * (now - self._earned_until))
        self._earned_until = now
        return self.balance >= 0.0

    def spend(self, seconds: float) -> None:
        """Drift work took this long."""
        if not self.unlimited:
            self.balance -= seconds


@dataclass(frozen=True)
class Prediction:
    """Class probabilities of a request's images, and which model produced them."""

    probabilities: np.ndarray  # (N, classes) float32
    model_version: str


class Predictor:
    """Owns one verified model; `predict` runs one eval-mode forward pass with the BN hooks inside it.

    One thread calls `predict` at a time (the inference worker process's, or LocalModel's thread). A Predictor
    never changes its model: a reload builds a new Predictor, so in-flight batches finish on the one they started
    with.

    >>> p = Predictor.load(Path("artifacts/mnist-bn"), drift_window=256)
    >>> p.predict(np.zeros((2, 1, 28, 28), np.float32)).shape
    (2, 10)
    """

    def __init__(
        self, artifact: Artifact, *, drift_window: int | None, top_channels: int = 5, drift_budget: float = 1.0
    ) -> None:
        self.artifact = artifact
        self.name = artifact.meta.name
        self.version = artifact.meta.version
        self.class_names = list(artifact.meta.class_names)
        # channels-last (NHWC) convolutions are ~2× faster on CPU for batches ≥ 8 (bench/README.md).
        self._net = artifact.net.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # each BN layer inside the convolution before it (in place: the Predictor owns the artifact's net); the
        # drift hooks still get the BN inputs' moments
        fold_batchnorm(self._net)
        self._mean = float(artifact.normalization.mean)
        self._std = float(artifact.normalization.std)
        self.recorder: BnStatsRecorder | None = None
        # BN inputs of answered batches whose moments are not in the drift window yet (see record_drift).
        self._unrecorded: list[dict[str, torch.Tensor]] = []
        self._unrecorded_images = 0
        self._drift_lock = threading.Lock()
        self._budget = DriftBudget(drift_budget)
        self.images_unmonitored = 0  # served past the drift budget
        self._plain_seconds: dict[int, float] = {}  # batch size → a forward pass's seconds, unmonitored (moving mean)
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
    def load(
        cls, path: Path, *, drift_window: int | None, top_channels: int = 5, drift_budget: float = 1.0
    ) -> Predictor:
        """Load, verify and smoke-test an artifact; raises ArtifactError (or ValueError) if it is not servable."""
        predictor = cls(
            load_artifact(path), drift_window=drift_window, top_channels=top_channels, drift_budget=drift_budget
        )
        predictor.self_test()
        return predictor

    def self_test(self) -> None:
        """A forward pass on a blank and a random image must give finite probabilities that sum to 1."""
        x = np.zeros((2, 1, 28, 28), np.float32)
        x[1] = np.random.default_rng(0).random((1, 28, 28), dtype=np.float32)
        try:
            probs = self._forward(x)
        except RuntimeError as exc:  # e.g. a network built for other input than 1×28×28 images
            raise ArtifactError(f"self-test forward pass failed: {exc}") from None
        if probs.shape != (2, len(self.class_names)) or not np.isfinite(probs).all():
            raise ArtifactError(f"self-test forward pass gave invalid output of shape {probs.shape}")
        if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
            raise ArtifactError("self-test forward pass gave probabilities that do not sum to 1")

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8, 64)) -> None:
        """Run a few forward passes (and drift moments, not counted) so the first requests do not pay for lazy
        initialisation."""
        for n in batch_sizes:
            blank = np.zeros((n, 1, 28, 28), np.float32)
            if self.recorder is None:
                self._forward(blank)
                continue
            with self.recorder.capture_inputs() as inputs:
                self._forward(blank)
            with self._drift_lock, torch.inference_mode():
                self.recorder.moments(inputs)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 1, 28, 28) float32 pixels in [0, 1] → (N, classes) float32 probabilities; feeds the drift window.

        The drift work keeps to its budget (DriftBudget): a batch past it is answered without feeding the window.

        Where the drift moments are computed depends on the batch (measured in bench/README.md):
        - a batch of at least INLINE_DRIFT_IMAGES images computes them in the BN hooks, during the forward pass: the
          activations are still in cache, and every client of the batch is waiting anyway (measured: on a second
          thread of the inference worker the moments contended with the next forward pass for the GIL, no gain);
        - a smaller batch only keeps its BN inputs; `record_drift`, which the caller runs once the answer has gone
          (service/worker.py), computes them per DRIFT_CHUNK images. At low load that takes the ~50 torch calls of
          the moments, which cost the same for 1 image as for 32, off the latency path and amortises them.
        """
        if self.recorder is None or self.monitor is None:
            return self._forward(pixels)
        with self._drift_lock:
            monitored = self._budget.allows()
        if not monitored:
            started = time.perf_counter()
            probs = self._forward(pixels)
            took = time.perf_counter() - started
            with self._drift_lock:
                self.images_unmonitored += len(pixels)
                plain = self._plain_seconds.get(len(pixels), took)
                self._plain_seconds[len(pixels)] = plain + 0.1 * (took - plain)
            return probs
        if len(pixels) >= INLINE_DRIFT_IMAGES:
            with self._drift_lock:
                drift = self._fold_kept()  # smaller batches answered earlier go first: the window keeps arrival order
                hooks_before = self.recorder.seconds
                with self.recorder.capture() as moments:
                    probs = self._forward(pixels)
                updating = time.perf_counter()
                self.monitor.update(moments)
                # the moments computed inside the forward pass, and the update
                drift += self.recorder.seconds - hooks_before + time.perf_counter() - updating
                self._budget.spend(drift)
            return probs
        started = time.perf_counter()
        with self.recorder.capture_inputs() as inputs:
            probs = self._forward(pixels)
        took = time.perf_counter() - started
        with self._drift_lock:
            self._unrecorded.append(inputs)
            self._unrecorded_images += len(pixels)
            # What keeping the inputs added to the forward pass (the hooks, their slow call path, the copies): 120-205
            # µs on a 1-image pass of ~500 µs (bench/README.md), more than its share of the fold. Charged once unmonitored passes of this size have shown
            # what a plain one takes. The moments are charged when record_drift folds them in.
            usual = self._plain_seconds.get(len(pixels))
            if usual is not None:
                self._budget.spend(max(0.0, took - usual))
        return probs

    def record_drift(self, min_images: int = DRIFT_CHUNK) -> None:
        """Fold the BN inputs kept from small batches into the drift window once `min_images` images wait.

        A drift report folds in whatever waits first, so no report misses an image already answered.
        """
        if self.recorder is None or self.monitor is None:
            return
        with self._drift_lock:  # also keeps the recorder's scratch buffers to one thread at a time
            if self._unrecorded_images >= min_images:
                self._budget.spend(self._fold_kept())

    def _fold_kept(self) -> float:
        """(Holding the drift lock.) Moments of every kept BN input, in one pass, into the window; its seconds."""
        if not self._unrecorded or self.recorder is None or self.monitor is None:
            return 0.0
        started = time.perf_counter()
        kept, self._unrecorded, self._unrecorded_images = self._unrecorded, [], 0
        with torch.inference_mode():
            inputs = kept[0] if len(kept) == 1 else {n: torch.cat([k[n] for k in kept]) for n in kept[0]}
            self.monitor.update(self.recorder.moments(inputs))
        return time.perf_counter() - started

    def drift_report(self) -> DriftReport | None:
        """The drift report over every image answered so far (None without monitoring)."""
        if self.monitor is None:
            return None
        self.record_drift(min_images=1)
        return replace(self.monitor.report(), images_unmonitored=self.images_unmonitored)

    def reset_drift(self) -> None:
        """Start a new, empty drift window; images answered before the reset do not count."""
        if self.monitor is None:
            return
        with self._drift_lock:
            self._unrecorded, self._unrecorded_images = [], 0
            self.monitor.reset()

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels)  # shares memory: no copy
        with torch.inference_mode():
            x = ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
            return torch.softmax(self._net(x), dim=1).numpy()
