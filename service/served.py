"""The model being served, as the routes and the batcher see it, wherever its forward pass runs.

`ServedModel` is the interface; `LocalModel` runs the model on one thread of the server process
(`BNSERVE_INFERENCE_PROCESS=false`); `service.worker.WorkerModel`, the default, in an inference worker process.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.drift import DriftReport
from service.engine import EngineName
from service.heap import keep_model_heap_mapped
from service.predictor import Predictor


@dataclass(frozen=True)
class ModelConfig:
    """What it takes to load the served model, wherever it runs. Plain values: it crosses to the worker."""

    artifact_dir: str
    drift_window: int | None
    top_channels: int
    torch_threads: int
    capacity: int  # most images in one forward pass (each slot of the shared region holds this many)
    log_level: str = "info"
    slots: int = 1  # batches that may be in flight at once (the batcher's max_in_flight)
    drift_budget: float = 1.0  # the drift work's most time as a fraction of wall-clock time (1: no cap)
    call_timeout: float = 30.0  # a worker silent this long is taken for hung: killed, then replaced
    engine: EngineName = "onnxruntime"  # what runs the forward pass (service/engine.py)


def load_predictor(config: ModelConfig) -> Predictor:
    """Load, verify, self-test and warm up the model; raises ArtifactError (or ValueError, OSError)."""
    keep_model_heap_mapped()  # activations stay mapped between forward passes (service/heap.py)
    torch.set_num_threads(config.torch_threads)
    predictor = Predictor.load(
        Path(config.artifact_dir),
        drift_window=config.drift_window,
        top_channels=config.top_channels,
        drift_budget=config.drift_budget,
        engine=config.engine,
    )
    predictor.warmup()
    return predictor


class ServedModel(ABC):
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


class LocalModel(ServedModel):
    """The model on one thread of this process (`BNSERVE_INFERENCE_PROCESS=false`): simpler, shares the GIL."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__(predictor.name, predictor.version, predictor.artifact.sha256, predictor.class_names)
        self.predictor = predictor
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")

    @classmethod
    async def start(cls, config: ModelConfig) -> LocalModel:
        return cls(await asyncio.to_thread(load_predictor, config))

    async def predict(self, payloads: list[np.ndarray]) -> np.ndarray:
        pixels = payloads[0] if len(payloads) == 1 else np.concatenate(payloads)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.predictor.predict, pixels)

    async def drift_report(self) -> DriftReport | None:
        return await asyncio.to_thread(self.predictor.drift_report)

    async def reset_drift(self) -> None:
        await asyncio.to_thread(self.predictor.reset_drift)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, True)
