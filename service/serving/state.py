"""What one running app holds: settings, metrics, the served model, the batcher; model (re)loading and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.api.errors import ApiError
from service.drift_report import DriftReport
from service.metrics import Metrics, MetricsObserver, ModelView
from service.serving.batching import BatcherClosedError, DeadlineExceededError, MicroBatcher, QueueFullError
from service.serving.handle import LocalHandle, ModelHandle, ModelLoadError
from service.serving.worker import WorkerDiedError, WorkerHandle
from service.settings import Settings
from service.wire import META_FILE, ModelConfig

logger = logging.getLogger("service.state")

RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # seconds between attempts to replace a dead worker


def _restarting() -> ApiError:
    return ApiError(
        503, "worker_restarting", "the inference worker stopped and a new one is starting; retry shortly",
        headers={"Retry-After": "2"},
    )  # fmt: skip


@dataclass(frozen=True)
class Prediction:
    """Class probabilities of a request's images, and the model that computed them."""

    probabilities: np.ndarray  # (N, classes) float32
    model: ModelHandle


def without_paths(message: str, artifact_dir: Path) -> str:
    """A load error's message for a client: the artifact directory's path (in any form) becomes "<artifact>"."""
    for form in sorted({str(artifact_dir.resolve()), str(artifact_dir)}, key=len, reverse=True):
        message = message.replace(form, "<artifact>")
    return message


class ServingState:
    """The app's live state. `model` (the served model) is swapped atomically by a reload; a batch reads it once."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: ModelHandle | None = None
        self.load_error: str | None = None
        self._reload_lock = asyncio.Lock()
        self._restart: asyncio.Task[None] | None = None
        self._scraped_drift: DriftReport | None = None  # fetched by /metrics just before each exposition
        self.batcher: MicroBatcher[np.ndarray, Prediction] = MicroBatcher(
            self._infer,
            max_batch_size=settings.max_batch_size,
            max_batch_delay=settings.max_batch_delay,
            max_queue=max(settings.max_queue_images, settings.max_batch_size),
            max_in_flight=settings.max_batches_in_flight,
            observer=MetricsObserver(metrics),
        )
        metrics.watch(self.view)

    def view(self) -> ModelView | None:
        p = self.model
        if p is None:
            return None
        return ModelView(name=p.name, version=p.version, sha256=p.sha256, drift=self._scraped_drift)

    async def refresh_drift(self) -> None:
        """Fetch the current drift report (from the inference worker) for the next metrics exposition."""
        p = self.model
        report = None
        if p is not None and p.alive:
            with contextlib.suppress(WorkerDiedError):
                report = await p.drift_report()
        self._scraped_drift = report

    def require_model(self) -> ModelHandle:
        p = self.model
        if p is None:
            raise ApiError(503, "not_ready", "the model is not loaded yet", headers={"Retry-After": "1"})
        if not p.alive:
            raise _restarting()
        return p

    async def _infer(self, payloads: list[np.ndarray]) -> list[Prediction]:
        """One forward pass for the whole batch (in the inference worker), split back per request."""
        model = self.model  # read once: the whole batch runs on the same model, and its answers name it
        if model is None:
            raise RuntimeError("no model loaded")
        try:
            probs = await model.predict(payloads)
        except WorkerDiedError:
            raise _restarting() from None
        top = probs.argmax(axis=1)
        for cls, count in zip(*np.unique(top, return_counts=True), strict=True):
            self.metrics.predictions.labels(model.class_names[int(cls)]).inc(int(count))
        for p in probs.max(axis=1).tolist():
            self.metrics.confidence.observe(p)
        bounds = np.cumsum([len(p) for p in payloads])[:-1]
        return [Prediction(part, model) for part in np.split(probs, bounds)]

    async def predict(self, pixels: np.ndarray) -> Prediction:
        """Queue images for the batcher and wait; batcher refusals become 503/504 errors."""
        self.require_model()
        try:
            result = await self.batcher.submit(pixels, size=len(pixels), timeout=self.settings.request_timeout)
        except QueueFullError as exc:
            raise ApiError(503, "overloaded", str(exc), headers={"Retry-After": "1"}) from None
        except BatcherClosedError as exc:
            raise ApiError(503, "shutting_down", str(exc), headers={"Retry-After": "5"}) from None
        except DeadlineExceededError as exc:
            raise ApiError(504, "deadline_exceeded", str(exc)) from None
        return result

    async def _start_model(self, expect_sha256: str | None = None) -> ModelHandle:
        """A new handle on the artifact; with `expect_sha256`, only if its weights are those (ModelLoadError else)."""
        s = self.settings
        if not (s.artifact_dir / META_FILE).is_file():  # fails at once, rather than in a worker seconds later
            raise ModelLoadError(f"no {META_FILE} in {s.artifact_dir}: is this an artifact directory?")
        config = ModelConfig(
            artifact_dir=str(s.artifact_dir),
            drift_window=s.drift_window if s.drift_enabled else None,
            top_channels=s.drift_top_channels,
            drift_sample=s.drift_sample,
            # On a shared box, spinning OpenMP workers on every core starve the event loop (bench/README.md).
            torch_threads=s.torch_threads or max(1, (os.cpu_count() or 2) // 2),
            capacity=max(s.max_batch_size, s.max_instances),
            log_level=s.log_level,
            call_timeout=s.inference_timeout,
            slots=s.max_batches_in_flight,
            engine=s.engine,
            expect_sha256=expect_sha256,
        )
        if s.inference_process:
            return await WorkerHandle.start(config, on_exit=self._worker_exited)
        return await LocalHandle.start(config)

    async def load_initial(self) -> None:
        try:
            self.model = await self._start_model()
        except (ModelLoadError, OSError) as exc:
            self.load_error = str(exc)
            logger.error("could not load the model: %s", exc)
            return
        self.load_error = None
        gc.collect()
        gc.freeze()  # long-lived objects leave the GC's scans, shortening pauses on the request path
        p = self.model
        logger.info("serving %s version %s (sha256 %s…)", p.name, p.version, p.sha256[:12])

    async def reload(self) -> ModelHandle:
        """Load and verify the artifact beside the current model, then swap. On failure the old model stays."""
        s = self.settings
        async with self._reload_lock:
            try:
                new = await self._start_model()
            except (ModelLoadError, OSError) as exc:
                self.metrics.reloads.labels("failure").inc()
                logger.error("reload refused, keeping the current model: %s", exc)
                reason = without_paths(str(exc), s.artifact_dir)
                raise ApiError(
                    422, "reload_failed", f"reload refused, the current model keeps serving: {reason}"
                ) from None
            old, self.model = self.model, new
            self.load_error = None
            self.metrics.reloads.labels("success").inc()
            logger.info("reloaded: %s → %s", old.version if old else None, new.version)
        if old is not None:
            await old.close()  # after the batch it may be running
        return new

    def _worker_exited(self, model: ModelHandle) -> None:
        """(On the event loop.) The worker of `model` died: if it is the one serving, start a replacement."""
        if model is self.model and self._restart is None:
            self.metrics.worker_restarts.inc()
            self._restart = asyncio.get_running_loop().create_task(self._replace_dead(model))

    async def _replace_dead(self, dead: ModelHandle) -> None:
        try:
            attempt = 0
            while True:
                attempt += 1
                try:
                    async with self._reload_lock:
                        if self.model is not dead:  # a reload got there first
                            return
                        # the model that was serving, or none: a restart never switches models silently
                        self.model = await self._start_model(expect_sha256=dead.sha256)
                    logger.info("inference worker replaced (attempt %d)", attempt)
                    await dead.close()
                    return
                except Exception as exc:  # whatever went wrong, keep trying: without a worker nothing is served
                    logger.error("could not restart the inference worker (attempt %d): %s", attempt, exc,
                                 exc_info=not isinstance(exc, ModelLoadError | OSError))  # fmt: skip
                    await asyncio.sleep(RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF)) - 1])
        finally:
            self._restart = None

    async def close(self) -> None:
        """(At shutdown, after the batcher drained.) Stop restarting and release the model."""
        if self._restart is not None:
            self._restart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart
        if self.model is not None:
            await self.model.close()
