"""The handle on the served model, as the routes and the batcher see it, wherever its forward pass runs.

`ModelHandle` is the interface; `LocalHandle` runs the model on one thread of the server process
(`BNSERVE_INFERENCE_PROCESS=false`); `service.serving.worker.WorkerHandle`, the default, in an inference worker process.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from service.drift_report import DriftReport
from service.wire import ModelConfig

if TYPE_CHECKING:
    from service.inference.predictor import Predictor


class ModelLoadError(RuntimeError):
    """The model could not be loaded (missing, malformed or tampered artifact, failed self-test). Safe to log; the
    message may hold filesystem paths, so clients get a generic form of it."""


class ModelHandle(ABC):
    """The model being served, as the routes and the batcher see it, wherever its forward pass runs."""

    def __init__(self, name: str, version: str, sha256: str, class_names: list[str]) -> None:
        self.name = name
        self.version = version
        self.sha256 = sha256
        self.class_names = class_names

    @property
    def ref(self) -> dict[str, str]:
        """How responses name this model: {"name": ..., "version": ...}."""
        return {"name": self.name, "version": self.version}

    @property
    def alive(self) -> bool:
        return True

    @abstractmethod
    async def predict(self, payloads: list[np.ndarray]) -> np.ndarray:
        """One forward pass over the requests' images, in order: (Σ N, 1, 28, 28) → (Σ N, classes) float32."""

    @abstractmethod
    async def drift_report(self) -> DriftReport | None:
        """The drift report over every image answered so far (None without monitoring)."""

    @abstractmethod
    async def reset_drift(self) -> None:
        """Start a new, empty drift window."""

    @abstractmethod
    async def close(self) -> None:
        """Finish the call in flight, then release the model."""


class LocalHandle(ModelHandle):
    """The model on one thread of this process (`BNSERVE_INFERENCE_PROCESS=false`): simpler, shares the GIL."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__(predictor.name, predictor.version, predictor.artifact.sha256, predictor.class_names)
        self.predictor = predictor
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")

    @classmethod
    async def start(cls, config: ModelConfig) -> LocalHandle:
        """Load the model on a thread of this process (which then imports torch); ModelLoadError if it cannot."""
        from model.artifact import ArtifactError  # torch: only where the model runs
        from service.inference.predictor import load_predictor

        try:
            return cls(await asyncio.to_thread(load_predictor, config))
        except (ArtifactError, ValueError, OSError) as exc:
            raise ModelLoadError(str(exc)) from None

    async def predict(self, payloads: list[np.ndarray]) -> np.ndarray:
        pixels = payloads[0] if len(payloads) == 1 else np.concatenate(payloads)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.predictor.predict, pixels)

    async def drift_report(self) -> DriftReport | None:
        return await asyncio.to_thread(self.predictor.drift_report)

    async def reset_drift(self) -> None:
        await asyncio.to_thread(self.predictor.reset_drift)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, True)
