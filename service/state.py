"""What one running app holds: settings, metrics, the current predictor, the batcher; and model (re)loading."""

from __future__ import annotations

import asyncio
import gc
import logging
import os

import numpy as np
import torch

from model.artifact import ArtifactError
from service.batching import BatcherClosedError, DeadlineExceededError, MicroBatcher, QueueFullError
from service.errors import ApiError
from service.metrics import Metrics, MetricsObserver, ModelView
from service.predictor import Prediction, Predictor
from service.settings import Settings

logger = logging.getLogger("service.state")


class ServingState:
    """The app's live state. `predictor` is swapped atomically by a reload; a batch reads it once."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.predictor: Predictor | None = None
        self.load_error: str | None = None
        self._reload_lock = asyncio.Lock()
        self._last_predictor: Predictor | None = None  # the model of the last batch, for _after_batch
        self.batcher: MicroBatcher[np.ndarray, Prediction] = MicroBatcher(
            self._infer,
            max_batch_size=settings.max_batch_size,
            max_batch_delay=settings.max_batch_delay,
            max_queue=max(settings.max_queue_images, settings.max_batch_size),
            observer=MetricsObserver(metrics),
            after_batch=self._after_batch,
        )
        metrics.watch(self.view)

    def view(self) -> ModelView | None:
        p = self.predictor
        if p is None:
            return None
        drift = p.drift_report()
        return ModelView(name=p.name, version=p.version, sha256=p.artifact.sha256, drift=drift)

    def require_predictor(self) -> Predictor:
        p = self.predictor
        if p is None:
            raise ApiError(503, "not_ready", "the model is not loaded yet", headers={"Retry-After": "1"})
        return p

    def _infer(self, payloads: list[np.ndarray]) -> list[Prediction]:
        """Runs on the inference thread: one forward pass for the whole batch, split back per request."""
        predictor = self.predictor  # read once: the whole batch runs on the same model
        if predictor is None:
            raise RuntimeError("no model loaded")
        pixels = payloads[0] if len(payloads) == 1 else np.concatenate(payloads)
        probs = predictor.predict(pixels)
        self._last_predictor = predictor
        top = probs.argmax(axis=1)
        for cls, count in zip(*np.unique(top, return_counts=True), strict=True):
            self.metrics.predictions.labels(predictor.class_names[int(cls)]).inc(int(count))
        for p in probs.max(axis=1):
            self.metrics.confidence.observe(float(p))
        bounds = np.cumsum([len(p) for p in payloads])[:-1]
        return [Prediction(part, predictor.version) for part in np.split(probs, bounds)]

    def _after_batch(self) -> None:
        """Runs on the inference thread once a batch's results are out: the drift statistics."""
        if self._last_predictor is not None:
            self._last_predictor.record_drift()

    async def predict(self, pixels: np.ndarray) -> tuple[Predictor, Prediction]:
        """Queue images for the batcher and wait; batcher refusals become 503/504 errors."""
        predictor = self.require_predictor()
        try:
            result = await self.batcher.submit(pixels, size=len(pixels), timeout=self.settings.request_timeout)
        except QueueFullError as exc:
            raise ApiError(503, "overloaded", str(exc), headers={"Retry-After": "1"}) from None
        except BatcherClosedError as exc:
            raise ApiError(503, "shutting_down", str(exc), headers={"Retry-After": "5"}) from None
        except DeadlineExceededError as exc:
            raise ApiError(504, "deadline_exceeded", str(exc)) from None
        return predictor, result

    def _build_predictor(self) -> Predictor:
        s = self.settings
        # On a shared box, spinning OpenMP workers on every core starve the event loop: measured in bench/README.md.
        torch.set_num_threads(s.torch_threads or max(1, (os.cpu_count() or 2) // 2))
        window = s.drift_window if s.drift_enabled else None
        predictor = Predictor.load(s.artifact_dir, drift_window=window, top_channels=s.drift_top_channels)
        predictor.warmup()
        return predictor

    async def load_initial(self) -> None:
        try:
            self.predictor = await asyncio.to_thread(self._build_predictor)
        except (ArtifactError, ValueError, OSError) as exc:
            self.load_error = str(exc)
            logger.error("could not load the model: %s", exc)
            return
        self.load_error = None
        gc.collect()
        gc.freeze()  # the model's long-lived objects leave the GC's scans, shortening pauses on the request path
        logger.info(
            "serving %s version %s (sha256 %s…)",
            self.predictor.name,
            self.predictor.version,
            self.predictor.artifact.sha256[:12],
        )

    async def reload(self) -> Predictor:
        """Load and verify the artifact beside the current model, then swap. On failure the old model stays."""
        async with self._reload_lock:
            try:
                new = await asyncio.to_thread(self._build_predictor)
            except (ArtifactError, ValueError, OSError) as exc:
                self.metrics.reloads.labels("failure").inc()
                logger.error("reload refused, keeping the current model: %s", exc)
                raise ApiError(
                    422, "reload_failed", f"reload refused, the current model keeps serving: {exc}"
                ) from None
            old, self.predictor = self.predictor, new
            self.load_error = None
            self.metrics.reloads.labels("success").inc()
            logger.info("reloaded: %s → %s", old.version if old else None, new.version)
            return new
