"""The live drift monitor: a bounded, thread-safe window of the last W images' BN-input moments."""

from __future__ import annotations

import threading

import numpy as np

from model.bnstats import LayerReference, Moments, drift_from_sums
from model.calibration import Calibration
from service.drift_report import DriftReport, LayerReport


class DriftMonitor:
    """Keeps the last `window` images' per-layer moments in rings and scores them against the BN references.

    Memory is fixed at 2 · window · Σ channels float64 values, whatever the traffic. `update` is called by the
    thread that runs the forward passes; `report` by anyone. Both take one lock; a report sums the ring inside it
    (2 · W · C adds per layer) and does the KL and top-channel work outside.

    >>> monitor = DriftMonitor(recorder.references, artifact.calibration, window=256)
    >>> with recorder.capture() as moments:
    ...     net(x)
    >>> monitor.update(moments)
    >>> monitor.report().status   # "warming_up" until 256 images were seen, then "ok" or "drift"
    """

    def __init__(
        self, references: dict[str, LayerReference], calibration: Calibration, *, window: int, top_channels: int = 5
    ) -> None:
        if window <= 0:
            raise ValueError("window must be > 0")
        calibration.check_window(window)
        missing = set(references) - set(calibration.layer_thresholds)
        if missing:
            raise ValueError(f"calibration has no thresholds for layers {sorted(missing)}")
        self.references = references
        self.calibration = calibration
        self.window = window
        self.top_channels = top_channels
        self._thresholds = {name: calibration.layer_threshold(name, window) for name in references}
        self._model_threshold = calibration.model_threshold(window)
        self._s1 = {name: np.zeros((window, ref.channels)) for name, ref in references.items()}
        self._s2 = {name: np.zeros((window, ref.channels)) for name, ref in references.items()}
        self._per_image = dict.fromkeys(references, 0)
        self._lock = threading.Lock()
        self._head = 0
        self._filled = 0
        self._seen = 0

    @property
    def full(self) -> bool:
        """Whether the window holds `window` images."""
        return self._filled >= self.window

    def update(self, moments: dict[str, Moments]) -> None:
        """Push the moments of one forward pass (the same N images for every layer)."""
        n = next(iter(moments.values())).s1.shape[0]
        if n == 0:
            return
        keep = min(n, self.window)  # a batch bigger than the window only leaves its last `window` images
        with self._lock:
            head = self._head
            first = min(keep, self.window - head)  # rows up to the end of the ring, then wrap to the start
            for name, m in moments.items():
                s1, s2 = m.s1[n - keep :], m.s2[n - keep :]
                self._s1[name][head : head + first] = s1[:first]
                self._s2[name][head : head + first] = s2[:first]
                self._s1[name][: keep - first] = s1[first:]
                self._s2[name][: keep - first] = s2[first:]
                self._per_image[name] = m.per_image
            self._head = int((self._head + keep) % self.window)
            self._filled = min(self.window, self._filled + keep)
            self._seen += n

    def reset(self) -> None:
        """Start a new, empty window."""
        with self._lock:
            self._head = self._filled = 0
            for name in self.references:
                self._s1[name].fill(0.0)
                self._s2[name].fill(0.0)

    def report(self) -> DriftReport:
        with self._lock:
            filled, seen = self._filled, self._seen
            sums = {name: (self._s1[name].sum(axis=0), self._s2[name].sum(axis=0)) for name in self.references}
            per_image = dict(self._per_image)
        warming = filled < self.window
        layers = []
        ratios = []
        for name, ref in self.references.items():
            thr = self._thresholds[name]
            if warming:
                layers.append(LayerReport(name=name, images=filled, threshold=thr))
                continue
            s1, s2 = sums[name]
            drift = drift_from_sums(s1, s2, filled * per_image[name], ref)
            layers.append(
                LayerReport(
                    name=name, images=filled, threshold=thr, score=drift.score, mean_shift_rms=drift.mean_shift_rms,
                    log_var_ratio_mean_abs=drift.log_var_ratio_mean_abs,
                    top_channels=drift.top_channels(self.top_channels),
                )
            )  # fmt: skip
            ratios.append(drift.score / thr)
        return DriftReport(
            window=self.window, images=filled, images_seen=seen, layers=layers,
            model_threshold=self._model_threshold, model_statistic=max(ratios) if ratios else None,
        )  # fmt: skip
