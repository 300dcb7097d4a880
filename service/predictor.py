"""The predictor: one loaded artifact, its batched forward pass, and the drift monitor riding inside it."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from model.artifact import Artifact, ArtifactError, load_artifact
from model.bnstats import BnStatsRecorder
from model.net import fold_batchnorm
from service.drift import DriftMonitor, DriftReport
from service.engine import Engine, EngineName, TorchEngine, build_engine

logger = logging.getLogger("service.predictor")

# How old the drift budget's measure of a plain pass of a size may get, in seconds, once that many batches of the
# size in a row have been monitored (Predictor.predict).
PLAIN_REFRESH, PLAIN_REFRESH_BATCHES = 10.0, 64
PLAIN_SAMPLES = 32  # plain passes per batch size that PlainPassTimes keeps
WARMUP_MEASURED = 6  # plain passes per batch size that the warm-up measures
ENGINE_TOLERANCE = 1e-4  # most a probability may differ between the serving engine and torch at the self-test


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


class PlainPassTimes:
    """What a plain (unmonitored) forward pass takes, by batch size: what the drift budget subtracts from a monitored
    pass to find the drift work's share of it.

    The estimate is the fastest of the last PLAIN_SAMPLES plain passes of the size. Passes vary with the scheduler
    and the caches, and an estimate that is too high makes monitored passes look cheap: a moving mean that single
    slow passes pushed up let a 1 % budget take 2.5 % of the worker's time at c=1 (measured in process,
    bench/README.md), and a slow measure (a busy warm-up, a pass on a graph gone cold) let it monitor every batch.
    The fastest errs low, which is the safe side: it charges the drift work a little more than it took.
    """

    def __init__(self) -> None:
        self._passes: dict[int, deque[tuple[float, float]]] = {}  # size → (when, seconds), oldest first

    def add(self, images: int, seconds: float, now: float) -> None:
        self._passes.setdefault(images, deque(maxlen=PLAIN_SAMPLES)).append((now, seconds))

    def measured_at(self, images: int) -> float | None:
        """When a plain pass of this size was last measured (None: never)."""
        passes = self._passes.get(images)
        return passes[-1][0] if passes else None

    def estimate(self, images: int) -> float:
        """Seconds of a plain pass of this size. If this one was never measured, the next larger size's scaled down
        (an image costs less in a larger batch: erring low again), else the largest's scaled up; 0 if none was (all
        of a monitored pass then counts as drift work, until a plain pass shows what one takes)."""
        if not self._passes:
            return 0.0
        if images not in self._passes:
            nearest = min((n for n in self._passes if n > images), default=max(self._passes))
            return self.estimate(nearest) * images / nearest
        return min(seconds for _, seconds in self._passes[images])


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
        self,
        artifact: Artifact,
        *,
        drift_window: int | None,
        top_channels: int = 5,
        drift_budget: float = 1.0,
        engine: EngineName = "onnxruntime",
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
        self._drift_lock = threading.Lock()
        self._budget = DriftBudget(drift_budget)
        self.images_unmonitored = 0  # served past the drift budget
        self._plain_times = PlainPassTimes()
        self._monitored_in_a_row: dict[int, int] = {}  # batch size → monitored batches since its last plain one
        self._since = time.perf_counter()
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

    @property
    def ref(self) -> dict[str, str]:
        """How responses name this model: {"name": ..., "version": ...}."""
        return {"name": self.name, "version": self.version}

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        drift_window: int | None,
        top_channels: int = 5,
        drift_budget: float = 1.0,
        engine: EngineName = "onnxruntime",
    ) -> Predictor:
        """Load, verify and smoke-test an artifact; raises ArtifactError (or ValueError) if it is not servable."""
        predictor = cls(
            load_artifact(path),
            drift_window=drift_window,
            top_channels=top_channels,
            drift_budget=drift_budget,
            engine=engine,
        )
        predictor.self_test()
        return predictor

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
        """Run a few forward passes (and drift moments, not counted) so the first requests do not pay for lazy
        initialisation; the plain passes after the first two of each size tell the drift budget what one takes
        (the second can still be 3× slower: onnxruntime sizes its buffers for a new batch size)."""
        for n in batch_sizes:
            blank = np.zeros((n, 1, 28, 28), np.float32)
            for i in range(2 + WARMUP_MEASURED):
                started = time.perf_counter()
                self.engine.forward(blank)
                if i >= 2:
                    now = time.perf_counter()
                    self._plain_times.add(n, now - started, now)
            if self.recorder is not None:
                self.engine.forward_with_moments(blank)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 1, 28, 28) float32 pixels in [0, 1] → (N, classes) float32 probabilities; feeds the drift window.

        A monitored batch runs the engine's pass that also gives the moments of every BN layer's input (with
        onnxruntime, reductions inside the same graph); they go into the window before the batch is answered, so a
        drift report never misses an image already answered. The drift work keeps to its budget (DriftBudget): a
        batch past it runs the plain pass and does not feed the window.
        """
        if self.recorder is None or self.monitor is None:
            return self.engine.forward(pixels)
        images = len(pixels)
        with self._drift_lock:
            started = time.perf_counter()
            # A plain pass also when the measure of one is stale and every batch of this size has been monitored for
            # a while: a measure taken while the machine was busy (at warm-up, say) would make monitored passes
            # look free, and with every batch monitored none would correct it. At most one batch per size per
            # PLAIN_REFRESH seconds, and never in a short burst (which a fresh window may need whole).
            stale = (
                not self._budget.unlimited
                and self._monitored_in_a_row.get(images, 0) >= PLAIN_REFRESH_BATCHES
                and started - (self._plain_times.measured_at(images) or self._since) > PLAIN_REFRESH
            )
            monitored = self._budget.allows() and not stale
            self._monitored_in_a_row[images] = self._monitored_in_a_row.get(images, 0) + 1 if monitored else 0
        if not monitored:
            if stale:  # after a long monitored run the plain graph's memory is cold: measure a second, warm pass
                self.engine.forward(pixels)
                started = time.perf_counter()
            probs = self.engine.forward(pixels)
            now = time.perf_counter()
            with self._drift_lock:
                self.images_unmonitored += images
                self._plain_times.add(images, now - started, now)
            return probs
        probs, moments = self.engine.forward_with_moments(pixels)
        with self._drift_lock:
            self.monitor.update(moments)
            # the drift work: what the monitored pass took beyond a plain one of this size, and the update
            self._budget.spend(max(0.0, time.perf_counter() - started - self._plain_times.estimate(images)))
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
