"""The drift report: what the inference worker's drift monitor says about its window, as plain data.

Torch-free, so the event loop's process can rebuild it from the wire (`from_wire`) and export it as metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerReport:
    name: str
    images: int
    threshold: float
    score: float | None = None  # None while warming up
    mean_shift_rms: float = 0.0
    log_var_ratio_mean_abs: float = 0.0
    top_channels: list[dict[str, float | int]] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        return None if self.score is None else self.score / self.threshold

    @property
    def status(self) -> str:
        if self.score is None:
            return "warming_up"
        return "drift" if self.score > self.threshold else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.name, "status": self.status, "score": self.score, "threshold": self.threshold,
            "ratio": self.ratio, "mean_shift_rms": self.mean_shift_rms if self.score is not None else None,
            "log_var_ratio_mean_abs": self.log_var_ratio_mean_abs if self.score is not None else None,
            "window_images": self.images, "top_channels": self.top_channels,
        }  # fmt: skip


@dataclass(frozen=True)
class DriftReport:
    window: int
    images: int
    images_seen: int
    layers: list[LayerReport]
    model_threshold: float
    model_statistic: float | None
    images_unmonitored: int = 0  # answered without feeding the window (service/inference/sampling.py)

    @property
    def warming_up(self) -> bool:
        return self.images < self.window

    @property
    def status(self) -> str:
        if self.model_statistic is None:
            return "warming_up"
        return "drift" if self.model_statistic > self.model_threshold else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status, "window": self.window, "window_images": self.images,
            "images_seen": self.images_seen, "images_unmonitored": self.images_unmonitored,
            "whole_model": {"statistic": self.model_statistic, "threshold": self.model_threshold,
                            "definition": "max over layers of score / threshold"},
            "layers": [layer.to_dict() for layer in self.layers],
        }  # fmt: skip

    def to_wire(self) -> dict[str, Any]:
        """Plain fields (JSON-safe), for the trip from the inference worker; `from_wire` rebuilds the report."""
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> DriftReport:
        return cls(**{**wire, "layers": [LayerReport(**layer) for layer in wire["layers"]]})
