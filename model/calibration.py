"""Drift-score thresholds calibrated on clean held-out data, and their interpolation to any window size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.bnstats import LayerReference, Moments, window_scores

CALIBRATION_WINDOWS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)


def _interp_loglog(sizes: Sequence[int], values: Sequence[float], w: int) -> float:
    """Interpolate linearly in (log W, log threshold): scores fall roughly like 1/W, so this is nearly exact."""
    xs = np.log(np.asarray(sizes, dtype=np.float64))
    ys = np.log(np.maximum(np.asarray(values, dtype=np.float64), 1e-300))
    return float(np.exp(np.interp(np.log(w), xs, ys)))


@dataclass(frozen=True)
class Calibration:
    """Per-layer and whole-model thresholds by window size, at one quantile of the clean (null) distribution.

    The whole-model statistic is max over layers of score / layer threshold; its threshold is calibrated on an
    independent set of windows so that the whole-model false-alarm rate is `1 - quantile`.

    >>> cal.layer_threshold("features.0.1", 100)   # log-log interpolation between W=64 and W=128
    >>> cal.model_threshold(100)
    """

    window_sizes: tuple[int, ...]
    quantile: float
    windows_per_size: int
    layer_thresholds: dict[str, tuple[float, ...]]
    model_thresholds: tuple[float, ...]
    null_score_median: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.window_sizes)
        if n == 0 or list(self.window_sizes) != sorted(set(self.window_sizes)):
            raise ValueError("window_sizes must be non-empty, unique and increasing")
        if len(self.model_thresholds) != n or any(len(v) != n for v in self.layer_thresholds.values()):
            raise ValueError("every threshold row needs one value per window size")
        if not 0.5 < self.quantile < 1.0:
            raise ValueError("quantile must be in (0.5, 1)")

    @property
    def min_window(self) -> int:
        return self.window_sizes[0]

    def check_window(self, w: int) -> None:
        """Windows smaller than the smallest calibrated one would need extrapolation: refuse them."""
        if w < self.min_window:
            raise ValueError(f"window size {w} is below the smallest calibrated window ({self.min_window})")

    def layer_threshold(self, layer: str, w: int) -> float:
        """Threshold for a layer at window size w; above the largest calibrated W the largest W's (conservative)."""
        self.check_window(w)
        return _interp_loglog(self.window_sizes, self.layer_thresholds[layer], w)

    def model_threshold(self, w: int) -> float:
        self.check_window(w)
        return _interp_loglog(self.window_sizes, self.model_thresholds, w)

    def to_dict(self) -> dict[str, Any]:
        return {
            "window_sizes": list(self.window_sizes),
            "quantile": self.quantile,
            "windows_per_size": self.windows_per_size,
            "statistic": "layer: mean KL over channels; model: max over layers of score / layer threshold",
            "interpolation": "linear in (log W, log threshold); W above the largest uses the largest",
            "layer_thresholds": {k: list(v) for k, v in self.layer_thresholds.items()},
            "model_thresholds": list(self.model_thresholds),
            "null_score_median": {k: list(v) for k, v in self.null_score_median.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(
            window_sizes=tuple(int(w) for w in data["window_sizes"]),
            quantile=float(data["quantile"]),
            windows_per_size=int(data["windows_per_size"]),
            layer_thresholds={k: tuple(float(x) for x in v) for k, v in data["layer_thresholds"].items()},
            model_thresholds=tuple(float(x) for x in data["model_thresholds"]),
            null_score_median={k: tuple(float(x) for x in v) for k, v in data.get("null_score_median", {}).items()},
        )

    def model_statistic(self, scores: dict[str, np.ndarray], w: int) -> np.ndarray:
        """Whole-model statistic: max over layers of score / layer threshold (broadcasts over windows)."""
        ratios = [scores[name] / self.layer_threshold(name, w) for name in self.layer_thresholds]
        return np.max(np.stack(ratios), axis=0)


def random_windows(n_images: int, w: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k windows of w distinct image indices each, drawn from range(n_images) → (k, w)."""
    if w > n_images:
        raise ValueError(f"window {w} is larger than the {n_images} calibration images")
    return np.stack([rng.choice(n_images, size=w, replace=False) for _ in range(k)])


def calibrate(
    moments: dict[str, Moments],
    references: dict[str, LayerReference],
    *,
    window_sizes: Sequence[int] = CALIBRATION_WINDOWS,
    windows_per_size: int = 5000,
    quantile: float = 0.99,
    seed: int = 0,
) -> Calibration:
    """Thresholds from the null distribution of scores on clean held-out images' moments."""
    if windows_per_size < 200:
        raise ValueError("windows_per_size must be >= 200 for a stable high quantile")
    rng = np.random.default_rng(seed)
    n_images = next(iter(moments.values())).s1.shape[0]
    layer_rows: dict[str, list[float]] = {name: [] for name in moments}
    medians: dict[str, list[float]] = {name: [] for name in moments}
    for w in window_sizes:
        scores = window_scores(moments, references, random_windows(n_images, w, windows_per_size, rng))
        for name, s in scores.items():
            layer_rows[name].append(float(np.quantile(s, quantile)))
            medians[name].append(float(np.median(s)))
    partial = Calibration(
        window_sizes=tuple(window_sizes),
        quantile=quantile,
        windows_per_size=windows_per_size,
        layer_thresholds={k: tuple(v) for k, v in layer_rows.items()},
        model_thresholds=(1.0,) * len(window_sizes),
    )
    model_rows = []
    for w in window_sizes:  # independent windows, so the model threshold is not fitted to the same draws
        scores = window_scores(moments, references, random_windows(n_images, w, windows_per_size, rng))
        model_rows.append(float(np.quantile(partial.model_statistic(scores, w), quantile)))
    return Calibration(
        window_sizes=partial.window_sizes,
        quantile=quantile,
        windows_per_size=windows_per_size,
        layer_thresholds=partial.layer_thresholds,
        model_thresholds=tuple(model_rows),
        null_score_median={k: tuple(v) for k, v in medians.items()},
    )
